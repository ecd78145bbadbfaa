#!/usr/bin/env python
"""Result CSVs -> the papers' table (Markdown): old / new / all mIoU at the last step, per method and setting.

    python report.py results/                                  # every CSV under results/
    python report.py results/2024-05-01_voc_15-1_MiB_AWT.csv --per-class --plot curves.png
    python report.py results --dataset voc --task 15-1 '15-1[a-j]'  # the AWT paper's ten 15-1 orders: mean +- std
    python report.py a.csv b.csv --label "MiB (ours)" "MiB+AWT (ours)"

File names follow run.py: {date}_{dataset}_{task}_{name}.csv (the date may be empty). Definitions and the
difference from the reference's average_csv.py: metrics/report.py and the README ("Reproducing the paper").
"""
from __future__ import annotations

import argparse
import os
import sys

from experiment import ledger
from metrics import report
from utils.errors import UserError
from utils.flags import ArgumentParser, nonnegative_int
from utils.io import atomic_write_text


def decimals(text: str) -> int:
    value = nonnegative_int(text)
    if value > 6:
        raise argparse.ArgumentTypeError(f"{text!r}: at most 6 decimals")
    return value


def plot_path(text: str) -> str:
    if os.path.splitext(text)[1].lower() not in (".png", ".pdf", ".svg"):
        raise argparse.ArgumentTypeError(f"{text!r} must end in .png, .pdf or .svg (the plot's format)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], epilog="Exit status 2 on bad input.")
    p.add_argument("inputs", nargs="*", help="result CSV files or folders (searched recursively for *.csv)")
    p.add_argument("--wsss", action="store_true",
                   help="the inputs are wsss.py run folders: a table of their CAM-seed, pseudo-mask and "
                        "segmentation mIoU (wsss.json)")
    p.add_argument("--ledger", action="store_true",
                   help="the reproduction ledger (docs/reproduction.md): every published number we can run, ours next "
                        "to it from these CSVs, the difference, and flags where a run did not follow the published "
                        "recipe (batch, lr, epochs, class order, missing steps)")
    p.add_argument("--label", nargs="+", default=None,
                   help="method label per input (same count as inputs), instead of the name parsed from the file")
    p.add_argument("--dataset", nargs="+", default=[], help="only these datasets (shell patterns)")
    p.add_argument("--task", nargs="+", default=[], help="only these tasks, e.g. 15-1 '15-1[a-j]' (shell patterns)")
    p.add_argument("--name", nargs="+", default=[], help="only these run names, e.g. MiB_AWT 'PLOP*' (shell patterns)")
    p.add_argument("--reference-average", action="store_true",
                   help="old/new as the reference's average_csv.py computed them: x/X cells count as 0 in the "
                        "denominator; all = the CSV's mIoU column")
    p.add_argument("--per-class", action="store_true", help="also a per-class IoU table at the last step")
    p.add_argument("--per-step", action="store_true", help="also the all-classes mIoU after every step")
    p.add_argument("--separate-orders", action="store_true",
                   help="one row per class order (15-1a ... 15-1j) instead of their mean +- std")
    p.add_argument("--orders", default="paper", choices=["paper", "all"],
                   help="VOC 15-1 class orders pooled into mean +- std: paper = the AWT paper's ten (15-1 and 15-1a, "
                        "b, c, e ... j; default), all = the eleven (15-1d too)")
    p.add_argument("--plot", metavar="PNG", type=plot_path, default=None,
                   help="write per-step curves (all / old / new) to this file (.png, .pdf or .svg)")
    p.add_argument("--full-scale", action="store_true",
                   help="plot every panel on the same 0-100 %% mIoU axis (default: each panel fits its data)")
    p.add_argument("--output", "-o", metavar="MD", default=None, help="also write the Markdown to this file")
    p.add_argument("--columns", default="auto", choices=["auto", "remapped", "original"],
                   help="class order of the CSV columns: model (remapped) order as the reference wrote it, or "
                        "original class ids; auto decides from the x cells (default)")
    p.add_argument("--decimals", type=decimals, default=1, help="decimals of the percentages, 0 to 6 (default 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and not args.ledger:
        parser.error("give result CSV files or folders (or --ledger)")
    try:
        if args.wsss:
            sys.stdout.write(report.render_wsss(args.inputs, args.decimals))
            return 0
        if args.ledger:
            runs = report.load_runs(args.inputs, None, args.columns, args.dataset, args.task, args.name,
                                    allow_empty=True) if args.inputs else []
            sys.stdout.write(ledger.render_ledger(ledger.load_ledger(), runs, args.decimals))
            return 0
        runs = report.load_runs(args.inputs, args.label, args.columns, args.dataset, args.task, args.name)
        text = report.render(runs, reference_average=args.reference_average, per_class=args.per_class,
                             per_step=args.per_step, separate_orders=args.separate_orders, decimals=args.decimals,
                             orders=args.orders)
        if args.plot:
            groups = report.group_runs(runs, args.separate_orders, args.orders)
            report.plot_curves(groups, args.plot, args.reference_average, full_scale=args.full_scale)
        if args.output:
            atomic_write_text(args.output, text)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
