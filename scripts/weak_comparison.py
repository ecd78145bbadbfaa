"""WILSON's weak step against a CAM-only baseline and against MiB with pixel labels, on synthetic VOC 15-5
(weak-steps.md section 6.6, scaled to a CPU), several seeds of the weak step; every run starts from the same step 0
(FT with BCE, as WILSON's scripts, trained once with the first seed).

    python scripts/weak_comparison.py --out runs/weak_comparison --size 48 --epochs0 6   # synthetic VOC, CPU

Runs: WILSON (WILSON's flags: --weakly --alpha 0.5 --loss_de 1 --lr_policy warmup --affinity), CAM-only (the same
weak step with --cam gap --wilson_prior none --l_self 0 --alpha 1 and no PAMR: the localizer's own pseudo-labels
without prior, refinement or self-training), MiB on the pixel labels of the same step (the upper reference), and
WILSON with AWT (--att 25 --mask_att) in both weak-step modes (--awt_weak whole / localizer), and WILSON with
SimFormer's complementary loss, alone and with the pixel-pair transfer (--simformer_comp, --simformer_pairs), and
alone with the old model's foreground as its base region (--simformer_region oldfg) or at image size (--simformer_res
image).
Writes ``{out}/table.md`` (old / new / all after step 1, mean ± std over the seeds, and each seed) and
``{out}/results.json``; finished runs are read back, not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import run  # noqa: E402
from dataset.synthetic import generate  # noqa: E402
from metrics.report import read_run, step_scores  # noqa: E402
from metrics.results import results_csv_path  # noqa: E402

WEAK = ["--weakly", "--loss_de", "1", "--lr_policy", "warmup"]
WILSON = WEAK + ["--alpha", "0.5", "--affinity"]
AWT = ["--att", "25", "--mask_att"]
RUNS = {"WILSON": ("WILSON", WILSON),  # label: (run name, flags of the weak step)
        "CAM-only": ("CAM_only", WEAK + ["--alpha", "1", "--cam", "gap", "--wilson_prior", "none", "--l_self", "0"]),
        "MiB (pixel labels)": ("MiB", ["--method", "MiB"]),
        "WILSON + AWT (whole)": ("WILSON_AWT_whole", WILSON + AWT + ["--awt_weak", "whole"]),
        "WILSON + AWT (localizer)": ("WILSON_AWT_localizer", WILSON + AWT + ["--awt_weak", "localizer"]),
        # SimFormer's losses at the weak step (weak-steps.md section 4); J = 9 = every point of a 3 x 3 map (48 px)
        "WILSON + SimFormer comp": ("WILSON_SF_comp", WILSON + ["--simformer_comp", "0.15"]),
        "WILSON + SimFormer comp + pairs": ("WILSON_SF_pairs", WILSON + ["--simformer_comp", "0.15",
                                                                         "--simformer_pairs", "1",
                                                                         "--simformer_points", "9"]),
        # the spec's two options: base = the old model's confident foreground (from epoch 0); the loss at image size
        "WILSON + SimFormer comp (oldfg)": ("WILSON_SF_comp_oldfg", WILSON + ["--simformer_comp", "0.15",
                                                                              "--simformer_region", "oldfg"]),
        "WILSON + SimFormer comp (image)": ("WILSON_SF_comp_image", WILSON + ["--simformer_comp", "0.15",
                                                                              "--simformer_res", "image"])}


def common(data: str, out: str, seed: int, size: int) -> list[str]:
    return ["--dataset", "voc", "--task", "15-5", "--overlap", "--data_root", data, "--backbone", "resnet18",
            "--no_pretrained", "--norm_act", "abn", "--crop_size", str(size), "--batch_size", "8", "--num_workers",
            "0", "--no_progress", "--random_seed", str(seed), "--output_dir", out, "--date", "cmp"]


def scores(out: str, name: str) -> dict:
    path = results_csv_path(os.path.join(out, "results"), "cmp", "voc", "15-5", name)
    values = step_scores(read_run(path), 1)
    return {k: (None if values[k] is None else 100 * values[k]) for k in ("old", "new", "all")}


def write_seed_table(out: str, columns: list[str], keys, results: dict, seed_header: str, seed_cell, sep: str) -> str:
    """Markdown table of mean ± std over the seeds of every run (``results[label][seed][key]``; None values left
    out, "–" when none) and a column of each seed's ``seed_cell``; written to ``{out}/table.md`` with
    ``{out}/results.json``; returns the table."""
    lines = ["| run | " + " | ".join(columns) + f" | {seed_header} |", "|---|" + "---:|" * len(columns) + "---|"]
    for label, per_seed in results.items():
        cells = []
        for key in keys:
            values = [v[key] for v in per_seed.values() if v[key] is not None]
            if len(values) > 1:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
            else:  # one seed: no spread to show
                cells.append(f"{values[0]:.1f}" if values else "–")
        lines.append(f"| {label} | {' | '.join(cells)} | {sep.join(seed_cell(v) for v in per_seed.values())} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64, help="image and crop size of the synthetic data")
    p.add_argument("--epochs0", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8, help="epochs of the weak step (pseudo_ep = epochs / 8, as the spec)")
    p.add_argument("--lr", type=float, default=0.01, help="lr of step 1 (10x WILSON's 0.001: few iterations here)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="LABEL",
                   help="the runs to train and tabulate (default: all)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data")
    if not os.path.isdir(data):
        generate(data, "voc", size=args.size, n_train=600, n_val=150, seed=0,
                 cooccur=[(16, 18), (18, 20), (18, 9)])
    results: dict = {}
    pseudo_ep = max(1, args.epochs // 8)
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed{seed}")
        base = common(data, out, seed, args.size)
        # one step 0 (seed of the first run) for every seed: the seeds vary the weak step, whose comparison this is
        first = os.path.join(args.out, f"seed{args.seeds[0]}")
        step0 = os.path.join(first, "checkpoints", "15-5-voc_FT_bce_0.pth")
        if not os.path.isfile(step0):
            assert run.main(common(data, first, args.seeds[0], args.size) + [
                "--step", "0", "--bce", "--lr", "0.05", "--epochs", str(args.epochs0), "--name", "FT_bce"]) == 0
        for label in args.runs:
            name, flags = RUNS[label]
            path = results_csv_path(os.path.join(out, "results"), "cmp", "voc", "15-5", name)
            if not os.path.isfile(path):
                step = ["--step", "1", "--lr", str(args.lr), "--epochs", str(args.epochs), "--name", name,
                        "--step_ckpt", step0, *flags]
                if "--weakly" in flags:
                    step += ["--pseudo_ep", str(pseudo_ep)]
                assert run.main(base + step) == 0
            results.setdefault(label, {})[seed] = scores(out, name)
    table = write_seed_table(args.out, ["old", "new", "all"], ("old", "new", "all"), results, "per seed (all)",
                             lambda v: f"{v['all']:.1f}", ", ")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
