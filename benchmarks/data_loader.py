"""Data-loader benchmark: images per second of the training pipeline for several worker counts, side by side.

    python -m benchmarks.data_loader --data_root data/PascalVOC12 --workers 0,4,8,16 --crop_size 512 --batch 24
    python -m benchmarks.data_loader --workers 0,1,2 --crop_size 64 --batch 8       # synthetic VOC in a temp folder

The loader is the one ``run.py`` trains with: ``build_datasets`` (decode, LUT label remap, random resized crop
and flip in the workers, uint8 out) wrapped by ``utils.data.build_loader`` (seeded sampler, persistent workers,
prefetch 4, pinned memory on CUDA or with ``--pin_memory``), consumed as fast as possible.

Timing: with ``w`` workers the batches arrive in waves of ``w`` (every worker starts its first batch at once), so
the first wave (start-up) is timed apart and the steady rate is measured from the end of the first wave over
``--batches`` batches rounded up to whole waves, continuing into the next epochs if the split is short (as
training does). images/s per worker = steady images/s / ``w`` (0 workers: the main process). Compare the steady
figure with the training step's images/s (benchmarks/train_step.py): the pipeline keeps the GPU fed when it is
higher.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import int_list, markdown_table, pick_device
from dataset import build_datasets
from dataset.synthetic import generate
from utils.data import build_loader


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", default=None, help="dataset root (default: a synthetic VOC in a temp folder)")
    p.add_argument("--dataset", default="voc")
    p.add_argument("--task", default="15-5")
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--crop_size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="0,1,2,4", help="comma list of worker counts")
    p.add_argument("--batches", type=int, default=20,
                   help="batches timed after the first wave (rounded up to whole waves)")
    p.add_argument("--pin_memory", default="auto", choices=["auto", "on", "off"], help="auto: on with CUDA")
    p.add_argument("--device", default="auto", help="decides pinned memory with --pin_memory auto")
    p.add_argument("--synthetic_size", type=int, default=None, help="synthetic image height (default: crop size)")
    p.add_argument("--synthetic_train", type=int, default=None, help="synthetic train images (default: enough)")
    p.add_argument("--cache_root", default=None, help="index cache folder (default: a temp folder)")
    return p


def _batches_forever(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _measure(loader, workers: int, n_batches: int) -> dict:
    """Seconds to the end of the first wave, and steady images/s over ``n_batches`` rounded up to whole waves."""
    wave = max(workers, 1)
    n_timed = -(-n_batches // wave) * wave
    t0 = time.perf_counter()
    images, t_wave = 0, None
    for i, (x, _) in enumerate(_batches_forever(loader)):
        if i + 1 == wave:
            t_wave = time.perf_counter()
        elif i + 1 > wave:
            images += x.shape[0]
            if i + 1 == wave + n_timed:
                break
    seconds = time.perf_counter() - t_wave
    return {"startup_s": t_wave - t0, "images_per_s": images / seconds, "timed_batches": n_timed}


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    device = pick_device(args.device)
    pin = args.pin_memory == "on" or (args.pin_memory == "auto" and device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = args.data_root
        if root is None:
            root = os.path.join(tmp, "PascalVOC12")
            n = args.synthetic_train or max(64, args.batch * (args.batches + 1) * 2)
            info = generate(root, "voc", size=args.synthetic_size or args.crop_size, n_train=n, n_val=20, seed=0)
            print(f"synthetic VOC: {n} train images of {info['size']} px in {info['seconds']} s")
        train_ds, _, _ = build_datasets(dataset=args.dataset, root=root, task=args.task, step=args.step,
                                        overlap=True, crop_size=args.crop_size,
                                        cache_root=args.cache_root or os.path.join(tmp, "cache"))
        if len(train_ds) < args.batch:
            raise SystemExit(f"error: {len(train_ds)} training images, fewer than one batch of {args.batch}")
        rows, results = [], {}
        for w in int_list(args.workers):
            loader = build_loader(train_ds, batch_size=args.batch, train=True, num_workers=w, seed=0,
                                  pin_memory=pin)
            res = _measure(loader, w, args.batches)
            del loader
            res["per_worker"] = res["images_per_s"] / max(w, 1)
            results[w] = res
            rows.append([w, f"{res['startup_s']:.2f}", res["timed_batches"], f"{res['images_per_s']:.1f}",
                         f"{res['per_worker']:.1f}"])
    ref = results[min(results)]["images_per_s"]
    for row, w in zip(rows, results):
        row.append(f"{results[w]['images_per_s'] / ref:.2f}x")
    print(f"# data loader: {args.dataset} {args.task} step {args.step}, {len(train_ds)} training images, crop "
          f"{args.crop_size}, batch {args.batch}, pin_memory={pin}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print()
    print(markdown_table(["workers", "first wave s", "timed batches", "steady images/s", "images/s per worker",
                          f"vs {min(results)} workers"], rows))
    return {"pin_memory": pin, "workers": results}


if __name__ == "__main__":
    main()
