"""Class-index benchmark: how long the one-off class-presence pass over a split's label files takes, sequential
against the thread pool ``dataset.incremental.scan_presence`` uses for large splits, side by side.

    python -m benchmarks.presence --labels 2000 --size 480x640 --threads 1,2,4     # COCO-sized label files
    python -m benchmarks.presence --data_root data/coco --dataset coco               # a real split (train)

Synthetic labels are COCO-Stuff-like maps (background as stuff values with a few objects) written as PNGs into a
temporary folder in the ``coco`` layout and read by the real COCO reader; the rate is labels per second, and the
projection for COCO train 2017 (118,287 labels) is that rate applied to 118,287.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.common import int_list, markdown_table
from dataset.incremental import scan_presence
from dataset.readers import READERS

COCO_TRAIN = 118_287


def write_labels(root: str, n: int, height: int, width: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("images/train2017", "annotations/train2017"):
        os.makedirs(os.path.join(root, "coco", sub), exist_ok=True)
    image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        label = np.full((height, width), 91 + i % 91, np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(10, height // 3)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 90)
        stem = f"{i:012d}"
        Image.fromarray(label).save(os.path.join(root, "coco", "annotations/train2017", stem + ".png"))
        image.save(os.path.join(root, "coco", "images/train2017", stem + ".jpg"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.presence", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", default=None, help="a dataset root (default: synthetic COCO labels in a temp folder)")
    p.add_argument("--dataset", default="coco", help="reader of --data_root")
    p.add_argument("--labels", type=int, default=1000, help="synthetic label files")
    p.add_argument("--size", default="480x640", help="synthetic label size HxW (COCO's typical 480x640)")
    p.add_argument("--threads", type=int_list, default=[1, 2], help="comma list; 1 = the sequential pass")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            height, width = (int(v) for v in args.size.split("x"))
            write_labels(tmp, args.labels, height, width)
            root = tmp
        reader = READERS[args.dataset](root, "train")
        rows, base, reference = [], None, None
        for threads in args.threads:
            start = time.perf_counter()
            presence = scan_presence(reader, threads=threads)
            seconds = time.perf_counter() - start
            reference = presence if reference is None else reference
            assert np.array_equal(presence, reference), "the thread pool changed the index"
            base = base or seconds
            rate = len(reader) / seconds
            rows.append([str(threads), f"{rate:.0f}", f"{base / seconds:.2f}x",
                         f"{COCO_TRAIN / rate / 60:.1f} min"])
        print(f"{len(reader)} labels of {args.dataset} ({'synthetic ' + args.size if args.data_root is None else root}), "
              f"{os.cpu_count()} CPUs")
        print(markdown_table(["threads", "labels/s", "vs 1 thread", "COCO train 2017 (118,287)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
