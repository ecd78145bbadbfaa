"""The reproduction ledger: every published number the framework can run (``docs/ledger.toml``), the command that
runs it, and ours next to it once a result CSV exists.

    python report.py --ledger runs/results/                        # published, ours and the difference, with flags
    python -m experiment.ledger --markdown > docs/reproduction.md

A row's result is the newest CSV ``{date}_{dataset}_{task}_{name}.csv`` of its setting, protocol and run name. It is
flagged when its run record (``.run.json``, written by run.py) shows another lr, epoch count or effective batch than
the recipe of the row's wrapper, another class order, weights selected on the test images (``--select_best_on_val``
on VOC and ADE20K, as SSUL did), missing steps, or no record at all.
"""
from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass
from functools import lru_cache

from dataset.tasks import CROSS_DATASETS, canonical_task, first_test_source, num_steps
from experiment.recipes import Recipe, load_recipes
from metrics import report, summary
from metrics.results import read_run_record
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER_FILE = os.path.join(ROOT, "docs", "ledger.toml")
METRICS = ("old", "new", "all", "avg", "hiou")  # the published metrics a ledger row may carry


@dataclass(frozen=True)
class Row:
    id: str
    paper: str
    table: str
    dataset: str
    setting: str
    protocol: str  # overlap | disjoint
    method: str
    wrapper: str  # scripts/{wrapper}.sh
    command: str
    name: str  # run name: runs/results/{date}_{dataset}_{task}_{name}.csv
    published: dict  # {"old": 59.1, ...}, only the published metrics
    src: str
    ref: str
    gpus: int
    note: str
    test: str = ""  # the test source of a cross-dataset task (coco-voc: coco or voc); "" = its first

    @property
    def task(self) -> str:
        return recipe_of(self).task

    @property
    def run_name(self) -> str:
        """The CSV name: ``name``, with run_setting.sh's ``_disjoint`` suffix for the disjoint protocol."""
        if self.protocol == "disjoint" and not self.name.endswith("_disjoint"):
            return self.name + "_disjoint"
        return self.name


def _entries(path: str, table: str) -> list[dict]:
    """The ``[[table]]`` entries of the ledger file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle).get(table, [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read the ledger {path} ({exc})") from exc


@lru_cache(maxsize=None)
def load_ledger(path: str = LEDGER_FILE) -> tuple[Row, ...]:
    raw = _entries(path, "row")
    rows = []
    for r in raw:
        rows.append(Row(id=r["id"], paper=r["paper"], table=r["table"], dataset=r["dataset"], setting=r["setting"],
                        protocol=r.get("protocol", "overlap"), method=r["method"], wrapper=r["wrapper"],
                        command=r["command"], name=r["name"],
                        published={k: float(r[k]) for k in METRICS if k in r}, src=r["src"], ref=r.get("ref", ""),
                        gpus=int(r.get("gpus", 2)), note=r.get("note", ""), test=r.get("test", "")))
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate row ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return tuple(rows)


WSSS_METRICS = ("seed", "mask", "seg")


@lru_cache(maxsize=None)
def load_wsss_rows(path: str = LEDGER_FILE) -> tuple[dict, ...]:
    """The ``[[wsss]]`` entries: weakly-supervised segmentation numbers (CAM seeds, pseudo-masks, segmentation)."""
    raw = _entries(path, "wsss")
    for r in raw:
        missing = [k for k in ("id", "paper", "table", "dataset", "method", "command", "src") if k not in r]
        if missing:
            raise UserError(f"{path}: [[wsss]] entry {r.get('id', '?')} lacks {missing[0]}")
    return tuple(raw)


def recipe_of(row: Row) -> Recipe:
    """The recipe of the row's wrapper (``scripts/{dataset}/{method}_{setting}.sh``)."""
    dataset, _, stem = row.wrapper.partition("/")
    for (d, setting, method), recipe in load_recipes().items():
        if d == dataset and f"{method.lower()}_{setting}" == stem:
            return recipe
    raise UserError(f"ledger row {row.id}: no wrapper scripts/{row.wrapper}.sh in scripts/recipes.toml")


def _newest(runs: list[report.Run]) -> report.Run | None:
    return max(runs, key=lambda r: (r.date, os.path.getmtime(r.path)), default=None)


def find_run(row: Row, runs) -> report.Run | None:
    """The newest run of the row's dataset, task, protocol and name."""
    task = canonical_task(row.dataset, row.task)
    test = row.test or first_test_source(row.dataset)
    return _newest([r for r in runs if r.dataset == row.dataset and r.task == task and r.protocol == row.protocol
                    and r.name == row.run_name and r.test_set == test])


def flags(row: Row, run: report.Run) -> list[str]:
    """Why ``run`` may not be comparable with the published number of ``row``."""
    recipe, out = recipe_of(row), []
    total = num_steps(row.dataset, row.task)
    if run.last_step + 1 < total or len(run.values) < total:
        out.append(f"steps {len(run.values)}/{total}")
    records = read_run_record(run.path)
    if not records:
        return out + ["no run record: lr, batch and class order unknown"]
    for step, rec in sorted(records.items()):
        if rec.get("effective_batch") != recipe.batch:
            out.append(f"batch {rec.get('effective_batch')}≠{recipe.batch} (step {step})")
        if rec.get("lr") != recipe.lr_at(step):
            out.append(f"lr {_num(rec.get('lr'))}≠{_num(recipe.lr_at(step))} (step {step})")
        if rec.get("epochs") != recipe.epochs_at(step):
            out.append(f"epochs {rec.get('epochs')}≠{recipe.epochs_at(step)} (step {step})")
        if rec.get("task") and canonical_task(row.dataset, rec["task"]) != recipe.task:
            out.append(f"class order {rec['task']}≠{recipe.task}")
        if rec.get("backbone") and rec["backbone"] != recipe.backbone:
            out.append(f"backbone {rec['backbone']}≠{recipe.backbone}")
        if rec.get("selected_on") == "the test images":
            out.append("selected on the test images")
    return list(dict.fromkeys(out))  # each difference once, in step order


def _num(value) -> str:
    """A recorded number as the flags show it; '?' for one the record lacks."""
    return "?" if value is None else f"{value:g}"


def ours(run: report.Run) -> dict[str, float | None]:
    """Our summary metrics at the last step and PLOP's avg, in percent."""
    scores = report.step_scores(run)
    scores["avg"] = report.average_over_steps(run)
    return {k: (None if v is None else 100 * v) for k, v in scores.items()}


def published_hiou(row: Row) -> float | None:
    """The published hIoU (DKD prints it), else the one derived from the published old and new."""
    if "hiou" in row.published:
        return row.published["hiou"]
    values = {k: row.published[k] / 100 for k in ("old", "new") if k in row.published}
    hiou = summary.complete(values).get("hiou")
    return None if hiou is None else 100 * hiou


def _triple(values: dict, keys=("old", "new", "all"), decimals: int | None = 1) -> str:
    """``old / new / all``; ``decimals`` None: as published (``44.03``, ``5.3``)."""
    def cell(v):
        return "—" if v is None else (str(v) if decimals is None else f"{v:.{decimals}f}")
    return " / ".join(cell(values.get(k)) for k in keys)


def _setting(row: Row) -> str:
    test = f" @{row.test or first_test_source(row.dataset)}" if row.dataset in CROSS_DATASETS else ""
    return f"{row.dataset} {row.setting}{test}" + (" disj." if row.protocol == "disjoint" else "")


def render_ledger(rows, runs, decimals: int = 1) -> str:
    """Markdown: published, ours and ours - published (all) per row, hIoU (published: derived from its old and new),
    with the flags of each result."""
    lines = ["Published against ours (mIoU %, old / new / all at the last step; Δ = ours - published, all; hIoU = "
             "harmonic mean of old and new, the published one derived where the paper does not print it).", "",
             "| id | setting | method | published | ours | Δ all | hIoU pub. / ours | flags |",
             "|---|---|---|---|---|---:|---|---|"]
    found = 0
    for row in rows:
        run = find_run(row, runs)
        pub_h = published_hiou(row)
        if run is None:
            lines.append(f"| {row.id} | {_setting(row)} | {row.method} | {_triple(row.published, decimals=None)} | — | "
                         f"| {_triple({'pub': pub_h}, ('pub', 'ours'), decimals)} | not run |")
            continue
        found += 1
        mine = ours(run)
        delta = ("" if mine["all"] is None or "all" not in row.published
                 else f"{mine['all'] - row.published['all']:+.{decimals}f}")
        hious = _triple({"pub": pub_h, "ours": mine.get("hiou")}, ("pub", "ours"), decimals)
        lines.append(f"| {row.id} | {_setting(row)} | {row.method} | {_triple(row.published, decimals=None)} | "
                     f"{_triple(mine, decimals=decimals)} | {delta} | {hious} | {'; '.join(flags(row, run)) or 'ok'} |")
    lines += ["", f"{found} of {len(rows)} rows have a result; commands: docs/reproduction.md."]
    return "\n".join(lines) + "\n"


def reproduction_markdown() -> str:
    """docs/reproduction.md: one row per published number with its source, command, batch and GPUs."""
    rows = load_ledger()
    out = ["# Reproduction ledger", "",
           "Every published number the framework can run, the command that runs it and the training recipe behind it.",
           "Generated from `docs/ledger.toml` by `python -m experiment.ledger --markdown` (a test keeps the two equal);",
           "`python report.py --ledger runs/results/` prints the same rows with our results and flags whatever differs from",
           "the published recipe (effective batch, lr, epochs, class order, missing steps).", "",
           "Numbers: mIoU (%) old / new / all at the last step (hIoU where the paper prints it), overlapped protocol",
           "unless marked `disj.`; `avg` is",
           "PLOP's mean of all over the steps. Sources: V primary (the paper's own table or the official",
           "repository), S secondary (a later paper quoting it), D derived by arithmetic. Batch: effective batch x",
           "GPUs of the published runs; the recipe column names the published script the wrapper mirrors",
           "(`scripts/recipes.toml`).", "",
           "**Ours: nothing is reproduced yet** (no GPU and no real dataset were available when this was written).", "",
           "| id | paper, table | setting | method | published | avg | src | command | batch x GPUs | recipe | ours |",
           "|---|---|---|---|---|---:|---|---|---|---|---|"]
    for row in rows:
        recipe = recipe_of(row)
        avg = str(row.published["avg"]) if "avg" in row.published else ""
        origin = recipe.id + ("" if recipe.published else " (no published script)")
        note = f" ({row.note})" if row.note else ""
        hiou = f" (hIoU {row.published['hiou']})" if "hiou" in row.published else ""
        out.append(f"| {row.id} | {row.paper}, {row.table}{note} | {_setting(row)} | {row.method} | "
                   f"{_triple(row.published, decimals=None)}{hiou} | {avg} | {row.src} | `{row.command}` | "
                   f"{recipe.batch} / {row.gpus} | {origin} | — |")
    out += ["", "## Weakly-supervised segmentation (`wsss.py`, docs/wsss.md)", "",
            "CAM-seed and pseudo-mask mIoU (%) on the training images, segmentation mIoU (%) on val; `—` = not "
            "published or not retrieved. `python report.py --wsss RUN_FOLDER` prints ours.", "",
            "| id | paper, table | dataset | method | seed / mask / seg | src | command | ours |",
            "|---|---|---|---|---|---|---|---|"]
    for r in load_wsss_rows():
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"| {r['id']} | {r['paper']}, {r['table']}{note} | {r['dataset']} | {r['method']} | "
                   f"{_triple(r, WSSS_METRICS, decimals=None)} | {r['src']} | `{r['command']}` | — |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/reproduction.md")
    args = parser.parse_args(argv)
    try:
        if args.markdown:
            sys.stdout.write(reproduction_markdown())
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
