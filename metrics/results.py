"""Results files: the reference CSV (one row per step) and a readable old/new/all summary next to it."""
from __future__ import annotations

import datetime
import json
import math
import os

from metrics import summary
from utils.errors import UserError
from utils.io import atomic_write_text


TEST_SEPARATOR = "@"  # ``..._{name}@{source}.csv``: the results of a cross-dataset task's other test sets


def results_csv_path(results_dir: str, date: str, dataset: str, task: str, name: str, test: str = "") -> str:
    """``results/{date}_{dataset}_{task}_{name}.csv`` (date defaults to today, as YYYY-MM-DD); ``test``: a test source
    after a cross-dataset task's first, ``..._{name}@{test}.csv``."""
    date = date or datetime.date.today().isoformat()
    suffix = f"{TEST_SEPARATOR}{test}" if test else ""
    return os.path.join(results_dir, f"{date}_{dataset}_{task}_{name}{suffix}.csv")


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


def _row_step(line: str) -> int | None:
    """The step of a CSV row; None for a header or any line report.py skips."""
    head = line.split(",", 1)[0].strip()
    return int(head) if head.isdigit() else None


def read_rows(path: str) -> dict[int, str]:
    """``{step: row}`` of a results CSV as report.py reads it (a header line and blank lines are skipped)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [ln.strip() for ln in handle.read().splitlines()]
    return {step: ln for ln in lines if ln and (step := _row_step(ln)) is not None}


def upsert_row(path: str, step: int, row: str) -> None:
    """Write the row of ``step`` atomically, replacing an earlier row of the same step (a re-run); a header line of
    a file edited by hand is kept, blank lines are dropped."""
    header = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline().strip()
        if first and _row_step(first) is None:
            header = [first]
    rows = read_rows(path)
    rows[step] = row
    atomic_write_text(path, "\n".join(header + [rows[s] for s in sorted(rows)]) + "\n")


def summary_path(csv_path: str) -> str:
    return os.path.splitext(csv_path)[0] + "_summary.md"


def format_summary(rows: list[dict], title: str) -> str:
    """A Markdown table of the summary metrics (mIoU % old / new / all, hIoU) per step."""
    names = summary.SUMMARY
    out = [f"### {title}", "", "| step | " + " | ".join(summary.label(n) for n in names) + " |",
           "|---:|" + "---:|" * len(names)]
    out += [f"| {r['step']} | " + " | ".join(summary.percent(r.get(n)) for n in names) + " |" for r in rows]
    return "\n".join(out) + "\n"


def run_record_path(csv_path: str) -> str:
    """``{csv}.run.json`` next to a results CSV: how each step of the run was trained (read by the ledger)."""
    return os.path.splitext(csv_path)[0] + ".run.json"


def update_run_record(csv_path: str, step: int, record: dict) -> None:
    """Store ``record`` (JSON-serialisable) for ``step``, keeping the other steps' records; written atomically."""
    path = run_record_path(csv_path)
    data: dict = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            data = {}  # unreadable: this step's record replaces it
    steps = data.get("steps") if isinstance(data.get("steps"), dict) else {}
    steps[str(step)] = record
    atomic_write_text(path, json.dumps({"steps": dict(sorted(steps.items(), key=lambda kv: int(kv[0])))},
                                       indent=1, sort_keys=False) + "\n")


_RECORD_NUMBERS = ("lr", "epochs", "effective_batch", "batch_size", "processes", "grad_accum", "random_seed")
_RECORD_TEXTS = ("task", "method", "name", "train_id", "data", "selected_on", "recipe", "norm_act", "command")


def read_run_record(csv_path: str) -> dict[int, dict]:
    """``{step: record}`` of a results CSV ({} when there is no record); ``UserError`` (one line, naming the file
    and the fix) when the file exists but is not a run record as run.py writes it."""
    path = run_record_path(csv_path)
    if not os.path.exists(path):
        return {}
    fix = "repair or delete it (run.py rewrites a step's record when it tests the step again)"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"run record {path} cannot be read ({str(exc).splitlines()[0][:80]}): {fix}") from None
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, dict):
        raise UserError(f"run record {path} has no \"steps\" object: {fix}")
    out: dict[int, dict] = {}
    for key, record in steps.items():
        if not str(key).isdigit() or not isinstance(record, dict):
            raise UserError(f"run record {path}: entry {str(key)[:20]!r} is not a step number with an object: {fix}")
        for field in _RECORD_NUMBERS:
            value = record.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise UserError(f"run record {path}, step {key}: {field} {str(value)[:20]!r} is not a number: {fix}")
        for field in _RECORD_TEXTS:
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                raise UserError(f"run record {path}, step {key}: {field} {str(value)[:20]!r} is not text: {fix}")
        out[int(key)] = record
    return out
