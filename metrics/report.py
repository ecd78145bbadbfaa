"""Turn result CSVs into the papers' tables: old / new / all mIoU at the last step, curves, per-class IoU.

Input: the files ``results/{date}_{dataset}_{task}_{name}.csv`` that ``run.py`` appends to, one row per tested step
and no header: ``step,IoU_0,...,IoU_{N-1},mIoU`` with IoU in [0, 1], ``x`` for a class not learnt yet and ``X`` for a
learnt class without ground-truth pixels in the test set. A step tested twice (a re-run) counts once: the last row.

Definitions (at the last step of a run, or any step for the curves):
- old = the classes of step 0, background included; new = the classes added after step 0; all = every seen class;
  hIoU = the harmonic mean of old and new (``metrics.summary``, where every reported metric is defined).
- Only classes with a number count: ``x`` and ``X`` cells are left out of numerators *and* denominators.
  The reference's ``average_csv.py`` divided by the number of columns instead (``x``/``X`` counted as 0);
  ``reference_average=True`` reproduces that, with "all" = the CSV's own mIoU column as the reference printed it.
- For the permuted VOC orders (15-1a ... 15-1j) old and new are the classes of each order's own table
  (``dataset.tasks.get_task_labels``); runs of the ten orders are pooled into one row, mean +- std.
- Several runs of the same dataset / setting / method (orders, seeds, dates) are pooled the same way; ``n`` says how
  many. std is the sample standard deviation (ddof = 1). One training counts once: CSVs whose rows were tested
  from the same checkpoint (the ``train_id`` of the run records ``{csv}.run.json``, e.g. a re-test into a CSV of
  another ``--date``) give one result per (run, step), not two.

Column order of a CSV: the reference wrote class IoUs in the model's *remapped* order (``[0] + labels_old +
labels``), which differs from the original class ids only for permuted orders. ``columns="auto"`` tells the two apart
from the position of the ``x`` cells of the earlier steps and falls back to ``DEFAULT_COLUMNS`` when the file
cannot tell (no ``x`` cell, or a non-permuted task where both orders coincide).
"""
from __future__ import annotations

import csv
import fnmatch
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from dataset import tasks as task_tables
from dataset.readers import space_reader
from metrics import summary
from metrics.results import TEST_SEPARATOR, read_run_record
from utils.errors import UserError

DEFAULT_COLUMNS = "remapped"
ORDER_RE = re.compile(r"^(\d+-\d+)([a-z])$")
DISJOINT_SUFFIX = "_disjoint"


def _datasets() -> tuple[str, ...]:
    return tuple(task_tables.dataset_names())


def _num_classes(dataset: str) -> int:
    """All classes of ``dataset`` (background included): the classes of the reader its models predict."""
    return space_reader(dataset).NUM_CLASSES


def get_task_labels(dataset: str, task: str, step: int) -> tuple[list[int], list[int]]:
    return task_tables.get_task_labels(dataset, task, step)


def num_steps(dataset: str, task: str) -> int:
    return task_tables.num_steps(dataset, task)


def canonical_task(dataset: str, task: str) -> str:
    return task_tables.canonical_task(dataset, task)


def class_names(dataset: str) -> list[str]:
    """Class names for the per-class table, from the dataset's reader."""
    return list(space_reader(dataset).CLASS_NAMES)


# --------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Run:
    """One CSV file: the class IoUs of each tested step, keyed by original class id."""

    path: str
    date: str
    dataset: str
    task: str
    name: str
    label: str
    protocol: str                       # "overlap" or "disjoint" (from a ``_disjoint`` name suffix)
    columns: str                        # "remapped" or "original"
    raw: dict[int, list[str]] = field(default_factory=dict)     # step -> class cells in CSV column order
    values: dict[int, dict[int, object]] = field(default_factory=dict)  # step -> {class id: float | "x" | "X"}
    miou: dict[int, float | None] = field(default_factory=dict)         # step -> the CSV's mIoU column
    train_ids: dict[int, str] = field(default_factory=dict)  # step -> the training its row was tested from
    synthetic: bool = False                                  # trained on data of dataset/synthetic.py
    test_set: str = ""                                       # the test source (cross-dataset tasks: coco, voc)
    @property
    def last_step(self) -> int:
        return max(self.values)

    @property
    def total_steps(self) -> int:
        return num_steps(self.dataset, self.task)


def method_label(name: str) -> tuple[str, str]:
    """``(label, protocol)`` from a run name: ``MiB_AWT`` -> ``MiB+AWT``; a ``_disjoint`` suffix sets the protocol."""
    protocol = "overlap"
    if name.endswith(DISJOINT_SUFFIX) and len(name) > len(DISJOINT_SUFFIX):
        name, protocol = name[: -len(DISJOINT_SUFFIX)], "disjoint"
    return name.replace("_AWT", "+AWT"), protocol


def parse_filename(path: str) -> tuple[str, str, str, str]:
    """``(date, dataset, task, name)`` from ``{date}_{dataset}_{task}_{name}.csv`` (the date may be empty)."""
    base = os.path.basename(path)
    if not base.endswith(".csv"):
        raise UserError(f"{path}: not a .csv file (expected results/{{date}}_{{dataset}}_{{task}}_{{name}}.csv)")
    parts = base[:-4].split("_")
    # dataset and task names may hold "_" (cityscapes_domain, PLOP's 15-5s_b): the longest names that parse win
    datasets = sorted(_datasets(), key=lambda d: -len(d.split("_")))
    for i in range(len(parts)):
        for dataset in datasets:
            nd = len(dataset.split("_"))
            if "_".join(parts[i:i + nd]) != dataset:
                continue
            for nt in range(len(parts) - i - nd - 1, 0, -1):
                try:
                    task = canonical_task(dataset, "_".join(parts[i + nd:i + nd + nt]))
                except UserError:
                    continue
                return "_".join(parts[:i]), dataset, task, "_".join(parts[i + nd + nt:])
    raise UserError(f"{path}: cannot read dataset/task/name from the file name; expected "
                    f"{{date}}_{{dataset}}_{{task}}_{{name}}.csv with dataset one of {', '.join(_datasets())} "
                    "and a task of dataset/tasks.py, e.g. 2024-05-01_voc_15-1_MiB_AWT.csv")


def _cell(text: str, where: str) -> object:
    text = text.strip()
    if text in ("x", "X"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: cell {text!r} is neither a number nor x/X") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: cell {text!r} is not a result (run.py writes X for a class absent from the test "
                        "set and x for one not learnt yet); fix or remove the row")
    if not -1e-6 <= value <= 1 + 1e-6:
        raise UserError(f"{where}: IoU {value} outside [0, 1] (the CSV stores fractions, not percentages)")
    return value


def _step_order(dataset: str, task: str, step: int) -> tuple[list[int], list[int]]:
    """``(order, step0)``: original class id at each remapped index after ``step``, and the classes of step 0 (a
    domain-incremental dataset has every class at every step)."""
    if task_tables.is_domain_incremental(dataset):
        return task_tables.order(dataset, task, step), task_tables.base_classes(dataset, task)
    labels, labels_old = get_task_labels(dataset, task, step)
    seen = [c for c in labels_old + labels if c != 0]
    step0 = list(get_task_labels(dataset, task, 0)[0])
    return [0] + seen, sorted(set(step0) | {0})


def _consistent(cells: list[str], order: list[int], n: int) -> tuple[bool, bool]:
    """Whether the ``x`` cells of a row match the remapped and the original column order."""
    xs = {i for i, c in enumerate(cells) if c.strip() == "x"}
    remapped = xs == set(range(len(order), n))
    original = xs == set(range(n)) - set(order)
    return remapped, original


def read_run(path: str, label: str | None = None, columns: str = "auto") -> Run:
    """Read one result CSV; ``UserError`` (one line) for a missing file, a bad name or a malformed row."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    date, dataset, task, name = parse_filename(path)
    name, _, test_set = name.partition(TEST_SEPARATOR)
    n = _num_classes(dataset)
    total = num_steps(dataset, task)
    auto_label, protocol = method_label(name)
    rows: dict[int, list[str]] = {}
    mious: dict[int, object] = {}
    first_line: dict[int, int] = {}
    try:
        with open(path, newline="") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    for lineno, row in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not row or all(not c.strip() for c in row):
            continue
        if lineno == 1 and row[0].strip().lower() == "step":
            continue  # tolerate a header line
        if len(row) != n + 2:
            raise UserError(f"{where}: {len(row)} cells, expected {n + 2} for {dataset} "
                            f"(step, {n} class IoUs, mIoU)")
        try:
            step = int(row[0])
        except ValueError:
            raise UserError(f"{where}: step {row[0].strip()!r} is not an integer") from None
        if not 0 <= step < total:
            raise UserError(f"{where}: step {step} does not exist in {dataset} {task} (0..{total - 1})")
        for i, c in enumerate(row[1:-1]):
            _cell(c, f"{where} column {i + 1}")
        cells = [c.strip() for c in row[1:-1]]
        miou = _cell(row[-1], f"{where} (mIoU column)")
        if step in rows and (rows[step], mious[step]) != (cells, miou):
            raise UserError(f"{where}: a second row of step {step} with other values (first at line "
                            f"{first_line[step]}); keep the row of the run you mean and delete the other")
        first_line.setdefault(step, lineno)
        rows[step] = cells
        mious[step] = miou
    if not rows:
        raise UserError(f"{path}: no result rows (the run has not finished a step yet)")

    if columns == "auto":
        votes = set()
        for step, cells in rows.items():
            order, _ = _step_order(dataset, task, step)
            rem, orig = _consistent(cells, order, n)
            if rem != orig:
                votes.add("remapped" if rem else "original")
        columns = votes.pop() if len(votes) == 1 else DEFAULT_COLUMNS
    elif columns not in ("remapped", "original"):
        raise UserError(f"unknown column order {columns!r} (auto, remapped or original)")

    run = Run(path=path, date=date, dataset=dataset, task=task, name=name, label=label or auto_label,
              protocol=protocol, columns=columns, test_set=test_set or task_tables.first_test_source(dataset))
    for step in sorted(rows):
        cells = [_cell(c, path) for c in rows[step]]
        order, _ = _step_order(dataset, task, step)
        if columns == "remapped":
            ids = order + [c for c in range(n) if c not in order]
        else:
            ids = list(range(n))
        seen = set(order)
        vals = {}
        for col, cls in enumerate(ids):
            vals[cls] = cells[col] if cls in seen else "x"
        run.raw[step] = rows[step]
        run.values[step] = vals
        m = mious[step]
        run.miou[step] = m if isinstance(m, float) else None
    for step, record in read_run_record(path).items():
        if step in run.values and isinstance(record, dict):
            if record.get("train_id"):
                run.train_ids[step] = str(record["train_id"])
            run.synthetic = run.synthetic or record.get("data") == "synthetic"
    return run


def expand_inputs(inputs: Sequence[str]) -> list[tuple[str, str, bool]]:
    """``(file, input it came from, explicit)`` for files and folders (folders: every ``*.csv`` below them)."""
    out = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for folder, _dirs, files in os.walk(item):
                found += [os.path.join(folder, f) for f in files if f.endswith(".csv")]
            out += [(f, item, False) for f in sorted(found)]
        elif os.path.isfile(item):
            out.append((item, item, True))
        else:
            raise UserError(f"{item}: no such file or folder")
    return out


def load_runs(inputs: Sequence[str], labels: Sequence[str] | None = None, columns: str = "auto",
              datasets: Sequence[str] = (), tasks: Sequence[str] = (), names: Sequence[str] = (),
              warn=None, allow_empty: bool = False) -> list[Run]:
    """Read every CSV of ``inputs``; files inside folders whose names do not parse are skipped with a warning."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if labels and len(labels) != len(inputs):
        raise UserError(f"{len(labels)} --label values for {len(inputs)} inputs: give one label per input or none")
    label_of = dict(zip(inputs, labels)) if labels else {}
    runs = []
    for path, origin, explicit in expand_inputs(inputs):
        try:
            parse_filename(path)
        except UserError as exc:
            if explicit:
                raise
            warn(f"skipped {exc}")
            continue
        _date, dataset, task, name = parse_filename(path)
        if datasets and not any(fnmatch.fnmatchcase(dataset, p) for p in datasets):
            continue
        if tasks and not any(fnmatch.fnmatchcase(task, p) for p in tasks):
            continue
        if names and not any(fnmatch.fnmatchcase(name, p) for p in names):
            continue
        runs.append(read_run(path, label_of.get(origin), columns))
    if not runs and not allow_empty:
        raise UserError("no result CSVs found in " + ", ".join(inputs)
                        + (" matching the filters" if (datasets or tasks or names) else ""))
    return runs


# --------------------------------------------------------------------------------------------------------------------
# Numbers


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def step_scores(run: Run, step: int | None = None, reference_average: bool = False) -> dict[str, float | None]:
    """The summary metrics of ``run`` at ``step`` (default: its last tested step), fractions or None:
    old / new / all mIoU and hIoU (``metrics.summary.SUMMARY``)."""
    step = run.last_step if step is None else step
    vals = run.values[step]
    _order, step0 = _step_order(run.dataset, run.task, step)
    if reference_average:
        n = _num_classes(run.dataset)
        n_base = len(step0)
        if run.columns == "remapped":
            cells = run.raw[step]
            first, rest = cells[:n_base], cells[n_base:]
        else:
            cells = [str(vals[c]) for c in range(n)]
            first = [str(vals[c]) for c in step0]
            rest = [str(vals[c]) for c in range(n) if c not in step0]
        num = lambda cs: [float(c) for c in cs if c not in ("x", "X")]  # noqa: E731
        return summary.complete({"old": sum(num(first)) / len(first),
                                 "new": sum(num(rest)) / len(rest) if rest else None, "all": run.miou[step]})
    groups = task_tables.score_groups(run.dataset, run.task, step)  # a weak-shot task: base / novel
    old_of = (lambda c: c in step0) if groups is None else (lambda c: c in groups[0])  # noqa: E731
    new_of = (lambda c: c not in step0) if groups is None else (lambda c: c in groups[1])  # noqa: E731
    scores = summary.ClassScores(iou={c: (v if isinstance(v, float) else None) for c, v in vals.items()
                                      if old_of(c) or new_of(c)},
                                 old=tuple(c for c in vals if old_of(c)), new=tuple(c for c in vals if new_of(c)))
    return summary.compute(scores, summary.SUMMARY)


def average_over_steps(run: Run, reference_average: bool = False) -> float | None:
    """PLOP's "avg": mean over the tested steps of the all-classes mIoU."""
    return _mean(v for v in (step_scores(run, s, reference_average)["all"] for s in sorted(run.values))
                 if v is not None)


ORDER_SET_LABELS = {"paper": "the AWT paper's ten orders", "all": "all eleven orders"}


def setting_of(run: Run) -> str:
    """The setting's name as the papers write it (``50-50``, not the task ``50``)."""
    aliases = {canonical: alias for alias, canonical in task_tables.ALIASES[run.dataset].items()
               if not alias.startswith("15-5s")}  # PLOP's names of the VOC orders stay aliases only
    setting = aliases.get(run.task, run.task)
    return f"{setting} @{run.test_set}" if run.dataset in task_tables.CROSS_DATASETS else setting


def pooled_orders_label(orders: str) -> str:
    return f"15-1, {ORDER_SET_LABELS[orders]}"


def describe_order_set(orders: str) -> str:
    chosen = task_tables.ORDER_SETS[orders]
    left = [o for o in task_tables.ALL_ORDERS if o not in chosen]
    return (f"Class orders pooled into the '{pooled_orders_label(orders)}' rows (mean +- std over the runs found, n): "
            f"{', '.join(chosen)}" + (f"; left out: {', '.join(left)} (--orders all pools them too)" if left else "")
            + ".")


@dataclass
class Group:
    dataset: str
    setting: str
    protocol: str
    label: str
    runs: list[Run]
    retested: list[tuple[str, str]] = field(default_factory=list)  # (dropped CSV, the CSV it repeats)

    @property
    def synthetic(self) -> bool:
        return all(r.synthetic for r in self.runs)


def unique_at(runs: Iterable[Run], step: int) -> list[Run]:
    """The runs with a row at ``step``, one per training: rows tested from the same checkpoint count once."""
    out, seen = [], set()
    for run in runs:
        if step not in run.values:
            continue
        tid = run.train_ids.get(step)
        if tid is not None:
            if tid in seen:
                continue
            seen.add(tid)
        out.append(run)
    return out


def _drop_retests(group: Group) -> Group:
    """Keep one run per last-step training (the one with the most tested steps); note the others."""
    kept: dict[object, Run] = {}
    for run in sorted(group.runs, key=lambda r: (-len(r.values), r.path)):
        tid = run.train_ids.get(run.last_step)
        key = (run.last_step, tid) if tid is not None else id(run)
        if key in kept:
            group.retested.append((run.path, kept[key].path))
            continue
        kept[key] = run
    group.runs = [r for r in group.runs if any(r is k for k in kept.values())]
    return group


def group_runs(runs: Sequence[Run], separate_orders: bool = False, orders: str = "paper") -> list[Group]:
    """One group per (dataset, setting, protocol, method label). Runs of the VOC 15-1 class orders of a method pool
    into one group when a lettered order (15-1a ...) is among them: the orders of ``ORDER_SETS[orders]``
    (``paper``: 15-1 and 15-1a, b, c, e ... j; ``all``: the eleven); the others keep their own row."""
    if orders not in task_tables.ORDER_SETS:
        raise UserError(f"unknown order set {orders!r}; use one of {', '.join(task_tables.ORDER_SETS)}")
    chosen = set(task_tables.ORDER_SETS[orders])
    lettered = {(r.dataset, r.protocol, r.label) for r in runs
                if r.task in task_tables.ALL_ORDERS and ORDER_RE.match(r.task)}
    groups: dict[tuple, Group] = {}
    for run in runs:
        setting = setting_of(run)
        if not separate_orders and (run.dataset, run.protocol, run.label) in lettered and run.task in chosen:
            setting = pooled_orders_label(orders)
        key = (run.dataset, setting, run.protocol, run.label)
        groups.setdefault(key, Group(*key, runs=[])).runs.append(run)
    return [_drop_retests(g) for g in groups.values()]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std, len(vals)


def summarize(group: Group, reference_average: bool = False) -> dict[str, tuple[float | None, float | None, int]]:
    scores = [step_scores(r, reference_average=reference_average) for r in group.runs]
    out = {k: mean_std([s[k] for s in scores]) for k in summary.SUMMARY}
    out["avg"] = mean_std([average_over_steps(r, reference_average) for r in group.runs])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Markdown


def fmt(mean: float | None, std: float | None = None, decimals: int = 1) -> str:
    if mean is None:
        return "—"
    text = f"{100 * mean:.{decimals}f}"
    if std is not None:
        text += f" ± {100 * std:.{decimals}f}"
    return text


def _sort_key(group: Group):
    return (_datasets().index(group.dataset), group.setting, group.protocol, group.label)


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(groups: Sequence[Group], reference_average: bool = False, decimals: int = 1) -> str:
    rows = []
    for g in sorted(groups, key=_sort_key):
        s = summarize(g, reference_average)
        done = sorted({f"{r.last_step + 1}/{r.total_steps}" for r in g.runs})
        setting = g.setting + (" disjoint" if g.protocol == "disjoint" else "")
        dataset = g.dataset + (" (synthetic)" if g.synthetic else "")
        rows.append([dataset, setting, g.label, str(len(g.runs)), ",".join(done)]
                    + [fmt(s[k][0], s[k][1], decimals) for k in (*summary.SUMMARY, "avg")])
    header = ["dataset", "setting", "method", "n", "steps", *map(summary.label, summary.SUMMARY), "avg"]
    return _table(header, rows, ["---"] * 5 + ["---:"] * (len(summary.SUMMARY) + 1))


def per_class_table(groups: Sequence[Group], decimals: int = 1) -> str:
    """Last-step IoU per class (original ids), one column per group, one table per dataset."""
    out = []
    for dataset in _datasets():
        gs = sorted((g for g in groups if g.dataset == dataset), key=_sort_key)
        if not gs:
            continue
        names = class_names(dataset)
        header = ["id", "class"] + [f"{g.label} {g.setting}" + (" disj." if g.protocol == "disjoint" else "")
                                    for g in gs]
        rows = []
        for c in range(_num_classes(dataset)):
            cells = []
            for g in gs:
                vals = [r.values[r.last_step][c] for r in g.runs]
                nums = [v for v in vals if isinstance(v, float)]
                if nums:
                    m, sd, _ = mean_std(nums)
                    cells.append(fmt(m, sd, decimals))
                else:
                    cells.append("X" if "X" in vals else "x")
            rows.append([str(c), names[c]] + cells)
        out.append(_table(header, rows, ["---:", "---"] + ["---:"] * len(gs)))
    return "\n\n".join(out)


def steps_table(groups: Sequence[Group], reference_average: bool = False, decimals: int = 1) -> str:
    """All-classes mIoU after each step (mean over the runs of a group)."""
    longest = max(max(r.values) for g in groups for r in g.runs) + 1
    rows = []
    for g in sorted(groups, key=_sort_key):
        cells = []
        for step in range(longest):
            vals = [step_scores(r, step, reference_average)["all"] for r in unique_at(g.runs, step)]
            m, sd, _ = mean_std(vals)
            cells.append(fmt(m, sd, decimals) if vals else "")
        rows.append([g.dataset + (" (synthetic)" if g.synthetic else ""), g.setting, g.label] + cells)
    return _table(["dataset", "setting", "method"] + [f"step {s}" for s in range(longest)], rows,
                  ["---"] * 3 + ["---:"] * longest)


def plot_curves(groups: Sequence[Group], path: str, reference_average: bool = False, full_scale: bool = False) -> None:
    """One row per dataset/setting, columns all / old / new mIoU after each step; mean line, std band; integer
    step ticks; ``full_scale``: every panel on the same 0-100 % axis. Synthetic data is named in the titles."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    settings = sorted({(g.dataset, g.setting, g.protocol) for g in groups},
                      key=lambda k: (_datasets().index(k[0]), k[1], k[2]))
    fig, axes = plt.subplots(len(settings), 3, figsize=(13, 3.4 * len(settings)), squeeze=False)
    for row, key in enumerate(settings):
        for g in sorted((g for g in groups if (g.dataset, g.setting, g.protocol) == key), key=_sort_key):
            longest = max(max(r.values) for r in g.runs) + 1
            for col, metric in enumerate(("all", "old", "new")):
                xs, ms, sds = [], [], []
                for step in range(longest):
                    vals = [step_scores(r, step, reference_average)[metric] for r in unique_at(g.runs, step)]
                    m, sd, _ = mean_std(vals)
                    if m is not None:
                        xs.append(step)
                        ms.append(100 * m)
                        sds.append(100 * (sd or 0.0))
                if not xs:
                    continue
                ax = axes[row][col]
                (line,) = ax.plot(xs, ms, marker="o", label=g.label)
                if any(sds):
                    ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                                    color=line.get_color(), alpha=0.2)
        synthetic = all(g.synthetic for g in groups if (g.dataset, g.setting, g.protocol) == key)
        for col, metric in enumerate(("all", "old", "new")):
            ax = axes[row][col]
            title = f"{key[0]}{' (synthetic data)' if synthetic else ''} {key[1]}" + \
                (" disjoint" if key[2] == "disjoint" else "")
            ax.set_title(f"{title}: {metric} mIoU", fontsize="medium")
            ax.set_xlabel("step")
            ax.set_ylabel("mIoU (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if full_scale:
                ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(runs: Sequence[Run], *, reference_average: bool = False, per_class: bool = False, per_step: bool = False,
           separate_orders: bool = False, decimals: int = 1, orders: str = "paper") -> str:
    groups = group_runs(runs, separate_orders, orders)
    how = ("reference average (average_csv.py: x/X cells count as 0 in old/new; all = the CSV's mIoU column)"
           if reference_average else "x/X cells (class not learnt / absent from the test set) excluded")
    parts = [f"mIoU (%) at the last tested step; old = step-0 classes incl. background, new = later classes, hIoU = "
             f"their harmonic mean; {how}.",
             "", summary_table(groups, reference_average, decimals)]
    if any(g.setting == pooled_orders_label(orders) for g in groups):
        parts += ["", describe_order_set(orders)]
    retested = [pair for g in groups for pair in g.retested]
    if retested:
        parts += ["", "Counted once (tested from the same checkpoint as another CSV): " + "; ".join(
            f"{os.path.basename(a)} = {os.path.basename(b)}" for a, b in retested) + "."]
    if any(g.synthetic for g in groups):
        parts += ["", "(synthetic) = trained and tested on data of dataset/synthetic.py: the numbers show that the "
                  "pipeline works, not how the method does on the real dataset."]
    if per_step:
        parts += ["", "All-classes mIoU (%) after each step:", "", steps_table(groups, reference_average, decimals)]
    if per_class:
        parts += ["", "IoU (%) per class at the last tested step (x = not learnt, X = no pixel in the test set):", "",
                  per_class_table(groups, decimals)]
    return "\n".join(parts) + "\n"


def render_wsss(folders: Sequence[str], decimals: int = 1) -> str:
    """Markdown table of weakly-supervised runs (``wsss.py`` folders): CAM-seed, pseudo-mask (with the share of
    pixels the masks label) and segmentation mIoU, from each folder's ``wsss.json``; "–" for a stage not run yet."""
    import json

    if not folders:
        raise UserError("--wsss: give wsss.py run folders (each with a wsss.json)")
    lines = ["| run | seed mIoU | mask mIoU | mask coverage | segmentation mIoU |", "|---|---:|---:|---:|---:|"]
    for folder in folders:
        path = os.path.join(folder, "wsss.json")
        if not os.path.isfile(path):
            raise UserError(f"--wsss {folder}: no wsss.json (run wsss.py make_masks with --out {folder})")
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
        cells = [f"{result[k]:.{decimals}f}" if isinstance(result.get(k), (int, float)) else "–"
                 for k in ("seed_miou", "mask_miou", "mask_coverage", "seg_miou")]
        lines.append(f"| {folder} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
