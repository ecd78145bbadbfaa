"""Results files: the reference CSV (one row per step) and a readable old/new/all summary next to it."""
from __future__ import annotations

import datetime
import math
import os

from utils.io import atomic_write_text


def results_csv_path(results_dir: str, date: str, dataset: str, task: str, name: str) -> str:
    """``results/{date}_{dataset}_{task}_{name}.csv`` (date defaults to today, as YYYY-MM-DD)."""
    date = date or datetime.date.today().isoformat()
    return os.path.join(results_dir, f"{date}_{dataset}_{task}_{name}.csv")


def csv_row(step: int, class_iou: dict, n_seen: int, num_classes: int, miou: float) -> str:
    """``step,IoU_0,...,IoU_{N-1},mIoU`` in the model's class order: ``x`` not yet learnt, ``X`` absent from test."""
    cells = []
    for i in range(num_classes):
        if i >= n_seen:
            cells.append("x")
        elif class_iou.get(i, "X") == "X":
            cells.append("X")
        else:
            cells.append(repr(float(class_iou[i])))
    return ",".join([str(step), *cells, repr(float(miou))])


def upsert_row(path: str, step: int, row: str) -> None:
    """Write the row of ``step`` atomically, replacing an earlier row of the same step (a re-run)."""
    lines = []
    if os.path.exists(path):
        with open(path) as handle:
            lines = [ln for ln in handle.read().splitlines() if ln.strip() and ln.split(",")[0] != str(step)]
    lines.append(row)
    lines.sort(key=lambda ln: int(ln.split(",")[0]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def summary_path(csv_path: str) -> str:
    return os.path.splitext(csv_path)[0] + "_summary.md"


def format_summary(rows: list[dict], title: str) -> str:
    """A Markdown table of old/new/all mIoU (%) per step."""
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    out = [f"### {title}", "", "| step | old | new | all |", "|---:|---:|---:|---:|"]
    out += [f"| {r['step']} | {pct(r['old'])} | {pct(r['new'])} | {pct(r['all'])} |" for r in rows]
    return "\n".join(out) + "\n"
