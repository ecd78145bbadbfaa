"""Does DropClass loosen a model's reliance on co-occurring classes? A small experiment on the synthetic data.

    python scripts/dropclass_cooccurrence.py OUT [--epochs 10] [--size 64] [--train 400] [--val 120] [--seed 0]

1. A synthetic VOC whose class pairs 15:14 (person, motorbike) and 9:11 (chair, dining table) appear together in 90 %
   of the images that hold one of them, touching each other.
2. Offline training (one step, all classes), ResNet-18 from scratch: FT for E epochs, FT for 2E epochs (DropClass's
   budget without DropClass) and FT + DropClass for 2E epochs (the paper's 2x schedule).
3. ``evaluate.py`` on the validation images, then per pair member on the images that hold it, with its pixels
   ignored (``--images_with``) and with them also erased from the image (``--erase_class``: filled from the rest of
   the image), as the paper's supplementary Table B-1: the partner's IoU on the same images and pixels, with and
   without the erased class in view.

Prints a markdown table and writes OUT/results.json. Runs on a CPU in about ten minutes with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import run  # noqa: E402
from dataset.synthetic import generate  # noqa: E402
from experiment.config import parse_config  # noqa: E402
from methods import build_method  # noqa: E402

PAIRS = [(15, 14), (9, 11)]
NAMES = {9: "chair", 11: "diningtable", 14: "motorbike", 15: "person"}


def train_args(out: str, data: str, name: str, epochs: int, size: int, seed: int, extra: list[str]) -> list[str]:
    return ["--dataset", "voc", "--data_root", data, "--task", "offline", "--step", "0", "--backbone", "resnet18",
            "--no_pretrained", "--norm_act", "abn", "--crop_size", str(size), "--batch_size", "16", "--lr", "0.05",
            "--epochs", str(epochs), "--num_workers", "0", "--random_seed", str(seed), "--output_dir", out,
            "--name", name, "--no_progress", *extra]


def evaluation(args: list[str], *extra: str) -> dict:
    cfg = parse_config(args + list(extra), parser=evaluate.get_parser())
    return evaluate.evaluate_checkpoint(cfg, build_method(cfg))


def iou(res: dict, cls: int) -> float | None:
    value = res["Class IoU"][cls]
    return None if value == "X" else 100 * float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/dropclass_cooccurrence.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (data, checkpoints, results.json)")
    p.add_argument("--epochs", type=int, default=10, help="E: FT's epochs; the 2x runs train 2E")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    data = os.path.join(out, "PascalVOC12")
    if not os.path.isdir(data):
        generate(data, "voc", size=a.size, n_train=a.train, n_val=a.val, seed=a.seed, cooccur=PAIRS,
                 cooccur_prob=0.9)
    runs = {"FT (E)": ("FT_E", a.epochs, ["--method", "FT"]),
            "FT (2E)": ("FT_2E", 2 * a.epochs, ["--method", "FT"]),
            "FT + DropClass (2E)": ("FT_DropClass_2E", 2 * a.epochs, ["--method", "FT", "--dropclass"])}
    results = {}
    for label, (name, epochs, extra) in runs.items():
        args = train_args(os.path.join(out, "runs"), data, name, epochs, a.size, a.seed, extra)
        if run.main(args) != 0:  # a finished run is skipped: re-running re-evaluates
            return 1
        full = evaluation(args)
        row = {"epochs": epochs, "mIoU": 100 * full["Mean IoU"], "pairs": {}}
        for x, y in PAIRS:
            for erased, partner in ((x, y), (y, x)):
                same = evaluation(args, "--images_with", str(erased))
                res = evaluation(args, "--erase_class", str(erased))
                row["pairs"][f"{partner}|-{erased}"] = {"partner_iou": iou(same, partner),
                                                         "partner_iou_erased": iou(res, partner),
                                                         "images": res["erased"]["images"]}
        results[label] = row
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    keys = list(next(iter(results.values()))["pairs"])
    header = ["run", "epochs", "mIoU"] + [
        f"{NAMES[int(k.split('|-')[0])]} IoU: {NAMES[int(k.split('|-')[1])]} in view / erased" for k in keys]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, row in results.items():
        cells = [label, str(row["epochs"]), f"{row['mIoU']:.1f}"]
        for k in keys:
            pr = row["pairs"][k]
            fmt = (lambda v: "—" if v is None else f"{v:.1f}")
            cells.append(f"{fmt(pr['partner_iou'])} / {fmt(pr['partner_iou_erased'])}")
        print("| " + " | ".join(cells) + " |")
    images = {k: v["images"] for k, v in next(iter(results.values()))["pairs"].items()}
    print(f"\nvalidation images holding each erased class: {images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
