"""The metrics a run reports, registered in one place and computed once per step.

Every number of a step summary, of ``evaluate.py``, of ``report.py``'s tables and of the ledger comes from
:func:`compute`, which evaluates the registered metrics in registration order on a :class:`ClassScores`: the per-class
IoU of the step's classes (from the confusion matrix after a test, from a results CSV in the report), which of them
are old (the classes of step 0, background included) and new (added later), and the confusion matrix when there is
one. A metric reads one of three inputs:

* ``"iou"``: the per-class IoU and the old / new split (available everywhere);
* ``"matrix"``: the confusion matrix (after a test only; the report and the ledger work from CSVs and skip them);
* ``"values"``: the metrics computed before it (hIoU from old and new), so that a table that computes old / new /
  all its own way (the reference's averaging, ``report.py --reference_average``) still gets them from here.

Adding a metric is one decorated function here; the summaries list their columns in :data:`SUMMARY`.

Classes absent from the ground truth (IoU ``None``; ``"X"`` in the reference's tables) are left out of every mean,
and a mean over no class is ``None`` (e.g. "new" at step 0), never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from utils.registry import Registry

INPUTS = ("iou", "matrix", "values")


@dataclass(frozen=True)
class ClassScores:
    """The per-class IoU of one step (``None``: absent from the ground truth) and the old / new split of its classes
    (class ids in the step's index space)."""

    iou: Mapping[int, float | None]
    old: tuple[int, ...]
    new: tuple[int, ...]
    matrix: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def from_results(cls, results: Mapping[str, Any], classes: Sequence[int],
                     groups: tuple[Sequence[int], Sequence[int]] | None = None) -> "ClassScores":
        """From ``ConfusionMatrix.results()`` of a model with ``classes`` (classes per step). ``groups``: the
        (old, new) classes when they are not the steps' (a weak-shot task's base and novel classes, whose means are
        then over those classes only: ``dataset.tasks.score_groups``)."""
        n_base, n_seen = classes[0], sum(classes)
        old, new = groups if groups is not None else (range(n_base), range(n_base, n_seen))
        keep = set(old) | set(new)
        iou = {i: (None if v == "X" else float(v)) for i, v in results["Class IoU"].items() if i in keep}
        return cls(iou=iou, old=tuple(old), new=tuple(new), matrix=results.get("Confusion Matrix"))


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # column header and log name
    needs: str  # one of INPUTS
    compute: Callable[..., Any]  # (ClassScores) for "iou"/"matrix", (values dict) for "values"
    scalar: bool = True  # a fraction in [0, 1] (None when undefined); False: a structure (per-class IoU)


METRICS = Registry("metric")


def register_metric(name: str, label: str, *, needs: str = "iou", scalar: bool = True):
    """Decorator: register ``fn`` as the metric ``name``."""
    if needs not in INPUTS:
        raise ValueError(f"a metric needs one of {INPUTS}, not {needs!r}")

    def add(fn):
        METRICS.add(name, Metric(name=name, label=label, needs=needs, compute=fn, scalar=scalar))
        return fn
    return add


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


@register_metric("old", "old")
def old_miou(s: ClassScores) -> float | None:
    """Mean IoU of the classes of step 0, background included."""
    return _mean(s.iou.get(c) for c in s.old)


@register_metric("new", "new")
def new_miou(s: ClassScores) -> float | None:
    """Mean IoU of the classes added after step 0."""
    return _mean(s.iou.get(c) for c in s.new)


@register_metric("all", "all")
def all_miou(s: ClassScores) -> float | None:
    """Mean IoU of every class seen so far (the reference's Mean IoU)."""
    return _mean(s.iou.get(c) for c in (*s.old, *s.new))


@register_metric("hiou", "hIoU", needs="values")
def harmonic_iou(values: Mapping[str, Any]) -> float | None:
    """Harmonic mean of old and new mIoU (reported by papers since 2022); undefined without new classes."""
    old, new = values.get("old"), values.get("new")
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


@register_metric("pixel_acc", "pixel acc", needs="matrix")
def pixel_accuracy(s: ClassScores) -> float | None:
    """Correct pixels over valid pixels (the reference's Overall Acc)."""
    total = float(s.matrix.sum())
    return float(np.trace(s.matrix)) / total if total else None


@register_metric("class_iou", "class IoU", scalar=False)
def class_iou(s: ClassScores) -> dict[int, float | None]:
    return {c: s.iou.get(c) for c in (*s.old, *s.new)}


def compute(scores: ClassScores, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The registered metrics (or ``names``, in registration order) that the inputs allow: those needing the
    confusion matrix only when ``scores`` has one."""
    wanted = set(METRICS) if names is None else set(names)
    for name in wanted:
        METRICS.get_entry(name)
    values: dict[str, Any] = {}
    for name, metric in METRICS.items():
        if name not in wanted or (metric.needs == "matrix" and scores.matrix is None):
            continue
        values[name] = metric.compute(values if metric.needs == "values" else scores)
    return values


def complete(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` plus the metrics derived from them (``needs="values"``, e.g. hIoU from old and new)."""
    out = dict(values)
    for name, metric in METRICS.items():
        if metric.needs == "values" and name not in out:
            out[name] = metric.compute(out)
    return out


# The columns of the step summary, evaluate.py's line, the report's table and the ledger.
SUMMARY = ("old", "new", "all", "hiou")


def label(name: str) -> str:
    return METRICS.get_entry(name).label


def percent(value: float | None, decimals: int = 2, missing: str = "-") -> str:
    return missing if value is None else f"{100 * value:.{decimals}f}"


def format_line(values: Mapping[str, Any], names: Sequence[str] = SUMMARY, decimals: int = 2) -> str:
    """``old 54.10 | new 3.20 | all 41.98 | hIoU 6.04`` (percent; ``-`` when undefined)."""
    return " | ".join(f"{label(n)} {percent(values.get(n), decimals)}" for n in names)


def format_slashed(values: Mapping[str, Any], names: Sequence[str] = SUMMARY, decimals: int = 2) -> str:
    """``old / new / all / hIoU 54.10 / 3.20 / 41.98 / 6.04`` (percent; ``-`` when undefined)."""
    return (" / ".join(label(n) for n in names) + " "
            + " / ".join(percent(values.get(n), decimals) for n in names))
