#!/usr/bin/env python
"""The published scripts' last line, ``python3 average_csv.py RESULTSFILE [TASK]``, runs unchanged.

    python average_csv.py results/2024-05-01_voc_15-5s_PLOP.csv            # PLOP's form
    python average_csv.py results/2024-05-01_voc_15-1_MiB.csv 15-1          # AWT's form (the task is read from the
                                                                            # file name; a given TASK must agree)
    python average_csv.py FILE --reference-average                          # also the reference script's own lines

Prints what ``report.py FILE`` prints: old / new / all mIoU at the last step, with classes absent from the test set
left out (docs/deviations.md). ``--reference-average`` adds the lines the reference's average_csv.py printed (Last
Step, Final Mean IoU, Average Mean IoU, Mean IoU first / last, with x/X cells counted as 0).
"""
from __future__ import annotations

import argparse
import sys

from dataset.tasks import canonical_task
from metrics import report
from utils.errors import UserError


def reference_lines(run: report.Run) -> list[str]:
    """The reference script's printout for this CSV (PLOP's, which also printed the average over steps)."""
    last = run.last_step
    scores = report.step_scores(run, last, reference_average=True)
    final = run.miou[last]
    average = report.average_over_steps(run, reference_average=True)

    def pct(value):
        return "-" if value is None else f"{round(100 * value, 2)}"

    return [f"Last Step: {last}", f"Final Mean IoU {pct(final)}", f"Average Mean IoU {pct(average)}",
            f"Mean IoU first {pct(scores['old'])}", f"Mean IoU last {pct(scores['new'])}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a results CSV written by run.py")
    parser.add_argument("task", nargs="?", default=None, help="AWT's second argument: the task (checked)")
    parser.add_argument("--reference-average", action="store_true", help="also print the reference's own averages")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        run = report.read_run(args.path)
        if args.task is not None and canonical_task(run.dataset, args.task) != run.task:
            raise UserError(f"{args.path} holds task {run.task} of {run.dataset}, not {args.task}; check the "
                            "second argument")
        text = report.render([run], separate_orders=True)
        if args.reference_average:
            text += "\nThe reference's average_csv.py:\n" + "\n".join(reference_lines(run)) + "\n"
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
