"""Class-incremental task tables, as data.

``TASKS[dataset][task][step]`` is the list of original class ids introduced at ``step``; background (0) belongs
to step 0. The order of the ids inside a list matters: the remapped (model) index of a class is its position in
``[0] + labels_old + labels`` (see ``dataset/incremental.py``), which is what makes permuted tasks like ``15-1a``
differ from ``15-1``.

``15-1b`` ... ``15-1j`` are NOT the reference lists (PLOP's ``15-5s_c`` ... ``15-5s_k`` could not be recovered):
they were produced once with ``numpy.random.RandomState(2021)``: repeatedly ``[0] + permutation(1..20)``, skipping
any order equal to ``15-1a`` or an earlier one; the first 16 ids form step 0, the last five are the single steps.
The lists are hard-coded below; replace them with the reference lists for exact reproduction
(docs/deviations.md).
"""
from __future__ import annotations

from utils.errors import UserError


def _steps(*groups) -> dict[int, list[int]]:
    return {step: list(group) for step, group in enumerate(groups)}


def _base_then_singles(base: int, last: int) -> dict[int, list[int]]:
    """Step 0 = classes 0..base, then one class per step up to ``last``."""
    return _steps(range(base + 1), *[[c] for c in range(base + 1, last + 1)])


def _base_then_chunks(base: int, last: int, chunk: int) -> dict[int, list[int]]:
    """Step 0 = classes 0..base, then ``chunk`` classes per step up to ``last``."""
    return _steps(range(base + 1), *[range(s, min(s + chunk, last + 1)) for s in range(base + 1, last + 1, chunk)])


def _order(seq: list[int]) -> dict[int, list[int]]:
    """A 21-class VOC order: first 16 ids (incl. 0) are step 0, then one class per step."""
    assert len(seq) == 21 and seq[0] == 0
    return _steps(seq[:16], *[[c] for c in seq[16:]])


_VOC_ORDERS = {
    # reference (AWT 15-1a = PLOP 15-5s_b)
    "15-1a": [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10],
    # generated (see module docstring), not the reference lists
    "15-1b": [0, 4, 10, 20, 11, 3, 5, 9, 17, 12, 8, 6, 2, 19, 15, 16, 7, 18, 13, 14, 1],
    "15-1c": [0, 1, 4, 16, 14, 5, 9, 3, 2, 12, 13, 10, 19, 20, 8, 15, 11, 7, 6, 17, 18],
    "15-1d": [0, 18, 5, 17, 1, 7, 20, 15, 8, 3, 10, 14, 2, 4, 12, 6, 13, 11, 9, 16, 19],
    "15-1e": [0, 11, 17, 2, 16, 1, 7, 9, 6, 20, 3, 4, 13, 15, 14, 12, 5, 18, 19, 8, 10],
    "15-1f": [0, 4, 3, 10, 5, 17, 9, 1, 12, 14, 16, 8, 13, 15, 6, 11, 2, 18, 20, 7, 19],
    "15-1g": [0, 3, 5, 1, 6, 9, 11, 15, 20, 14, 2, 13, 18, 16, 12, 7, 10, 19, 17, 4, 8],
    "15-1h": [0, 19, 15, 13, 3, 18, 9, 10, 14, 11, 16, 5, 7, 4, 2, 20, 8, 17, 12, 6, 1],
    "15-1i": [0, 20, 19, 9, 18, 2, 16, 17, 8, 15, 1, 13, 4, 3, 6, 10, 12, 5, 11, 14, 7],
    "15-1j": [0, 11, 1, 18, 16, 7, 19, 9, 2, 20, 14, 17, 10, 6, 3, 15, 12, 13, 4, 5, 8],
}

TASKS: dict[str, dict[str, dict[int, list[int]]]] = {
    "voc": {
        "offline": _steps(range(21)),
        "19-1": _steps(range(20), [20]),
        "15-5": _steps(range(16), range(16, 21)),
        "15-1": _base_then_singles(15, 20),
        "10-1": _base_then_singles(10, 20),
        "5-3": _base_then_chunks(5, 20, 3),
        "5-1": _base_then_singles(5, 20),
        **{name: _order(seq) for name, seq in _VOC_ORDERS.items()},
    },
    "ade": {
        "offline": _steps(range(151)),
        "100-50": _steps(range(101), range(101, 151)),
        "100-10": _base_then_chunks(100, 150, 10),
        "100-5": _base_then_chunks(100, 150, 5),
        "50": _steps(range(51), range(51, 101), range(101, 151)),
    },
    "cityscapes": {
        "offline": _steps(range(20)),
        "14-1": _base_then_singles(14, 19),
        "14-5": _steps(range(15), range(15, 20)),
        "18-1": _steps(range(19), [19]),
        "10-1": _base_then_singles(10, 19),
    },
}

# Alternative names accepted on the command line; caches and logs use the canonical name.
ALIASES: dict[str, dict[str, str]] = {"voc": {}, "ade": {"50-50": "50"}, "cityscapes": {}}


def dataset_names() -> list[str]:
    return list(TASKS)


def task_names(dataset: str) -> list[str]:
    """Every accepted task name of ``dataset`` (canonical names first, then aliases)."""
    _check_dataset(dataset)
    return list(TASKS[dataset]) + list(ALIASES[dataset])


def all_task_names() -> list[str]:
    """Union of the task names of every dataset (for argparse ``choices``), in first-seen order."""
    seen: dict[str, None] = {}
    for dataset in TASKS:
        seen.update(dict.fromkeys(task_names(dataset)))
    return list(seen)


def canonical_task(dataset: str, task: str) -> str:
    _check_dataset(dataset)
    task = ALIASES[dataset].get(task, task)
    if task not in TASKS[dataset]:
        raise UserError(f"unknown task {task!r} for dataset {dataset!r}; valid tasks: "
                        f"{', '.join(task_names(dataset))} (fix --task)")
    return task


def _check_dataset(dataset: str) -> None:
    if dataset not in TASKS:
        raise UserError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(TASKS)} (fix --dataset)")


def _table(dataset: str, task: str, step: int) -> dict[int, list[int]]:
    task = canonical_task(dataset, task)
    table = TASKS[dataset][task]
    if not isinstance(step, int) or isinstance(step, bool) or step not in table:
        raise UserError(f"unknown step {step!r} for task {task!r} of dataset {dataset!r}; valid steps: "
                        f"0..{len(table) - 1} (fix --step)")
    return table


def num_steps(dataset: str, task: str) -> int:
    task = canonical_task(dataset, task)
    return len(TASKS[dataset][task])


def get_task_labels(dataset: str, task: str, step: int) -> tuple[list[int], list[int]]:
    """``(labels, labels_old)``: classes of ``step`` and of every earlier step (0 included, in table order).

    Both are new lists; the tables are never exposed for mutation."""
    table = _table(dataset, task, step)
    labels = list(table[step])
    labels_old = [c for s in range(step) for c in table[s]]
    return labels, labels_old


def classes_per_step(dataset: str, task: str, step: int) -> list[int]:
    """Number of classes of each step up to ``step`` included, e.g. VOC 15-1 step 2 -> ``[16, 1, 1]``."""
    table = _table(dataset, task, step)
    return [len(table[s]) for s in range(step + 1)]


def new_class_indices(dataset: str, task: str, step: int) -> list[int]:
    """Remapped (model output) indices of the classes introduced at ``step``.

    The remapped space is ``[0] + labels_old + labels`` in order, so the step's classes occupy a contiguous range
    right after all previous ones (step 0: ``0 .. n0-1``, background included)."""
    counts = classes_per_step(dataset, task, step)
    start = sum(counts[:-1])
    return list(range(start, start + counts[-1]))


def order(dataset: str, task: str, step: int) -> list[int]:
    """``[0] + labels_old + labels`` without duplicates: original id at each remapped index."""
    labels, labels_old = get_task_labels(dataset, task, step)
    return [0] + [c for c in labels_old + labels if c != 0]
