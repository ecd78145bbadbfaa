"""SimFormer's ablations on synthetic data (issue 29; the supplementary's Tables 1 and 2 scaled to a CPU): the basic
model (MaskFormer losses + complementary loss, no pixel pairs), pixel pairs within one image (self-pair), pixel pairs
across images (cross-pair, SimFormer) with J = 50, 100 and 150 points per image. Each run is one weak-shot step of
VOC ``ws15-5`` (classes 16-20 known from image labels only) from scratch, several seeds.

    python scripts/simformer_comparison.py --out runs/simformer_comparison   # synthetic VOC, CPU

``--seeds`` and ``--runs`` choose what to train (``--table_only`` trains nothing). Writes ``{out}/table.md`` (base / novel / all mIoU on the test set, mean ± std over the seeds, and each seed's novel
mIoU) and ``{out}/results.json``; finished runs are read back, not retrained.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import run  # noqa: E402
from dataset.synthetic import generate  # noqa: E402
from metrics.report import read_run, step_scores  # noqa: E402
from metrics.results import results_csv_path  # noqa: E402
from scripts.weak_comparison import write_seed_table  # noqa: E402

TASK = "ws15-5"
PAIRS = ["--pair_loss", "1", "--pair_distill", "0.1", "--pair_func", "cce"]
RUNS = {  # label: (run name, flags)
    "basic (no pixel pairs)": ("basic", []),
    "self-pair, J = 100": ("self_J100", PAIRS + ["--pair_mode", "self", "--pair_points", "100"]),
    "cross-pair, J = 50": ("cross_J50", PAIRS + ["--pair_points", "50"]),
    "cross-pair, J = 100 (SimFormer)": ("cross_J100", PAIRS + ["--pair_points", "100"]),
    "cross-pair, J = 150": ("cross_J150", PAIRS + ["--pair_points", "150"]),
}


def command(data: str, out: str, seed: int, size: int, epochs: int, lr: float, name: str, flags: list[str]) -> list[str]:
    return ["--dataset", "voc", "--task", TASK, "--step", "0", "--overlap", "--data_root", data,
            "--method", "SimFormer", "--backbone", "tv_resnet18", "--no_pretrained", "--backbone_bn", "train",
            "--mask_queries", "20",
            "--mask_layers", "3", "--optimizer", "adamw", "--weight_decay", "0.0001", "--clip_grad", "0.01",
            "--lr", str(lr), "--epochs", str(epochs), "--crop_size", str(size), "--batch_size", "8",
            "--num_workers", "0", "--no_progress", "--random_seed", str(seed), "--output_dir", out, "--date", "cmp",
            "--name", name, *flags]


def scores(out: str, name: str) -> dict:
    values = step_scores(read_run(results_csv_path(os.path.join(out, "results"), "cmp", "voc", TASK, name)), 0)
    return {k: 100 * values[k] for k in ("old", "new", "all")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64, help="image and crop size of the synthetic data (>= 64: J = 150 "
                                                        "points fit in the stride-4 map of one crop)")
    p.add_argument("--n_train", type=int, default=240)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.001, help="AdamW lr (10x SimFormer's 1e-4: few iterations, no "
                                                            "pretrained backbone)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="LABEL")
    p.add_argument("--table_only", action="store_true", help="train nothing: the table of the runs already finished")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data")
    if not os.path.isdir(data):
        generate(data, "voc", size=args.size, n_train=args.n_train, n_val=100, seed=0)
    results: dict = {}
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed{seed}")
        for label in args.runs:
            name, flags = RUNS[label]
            if not os.path.isfile(results_csv_path(os.path.join(out, "results"), "cmp", "voc", TASK, name)):
                if args.table_only:
                    continue
                assert run.main(command(data, out, seed, args.size, args.epochs, args.lr, name, flags)) == 0
            results.setdefault(label, {})[seed] = scores(out, name)
    table = write_seed_table(args.out, ["base", "novel", "all"], ("old", "new", "all"), results,
                             "per seed (novel)", lambda v: f"{v['new']:.1f}", ", ")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
