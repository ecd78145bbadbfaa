"""Class-incremental task tables, as data.

``TASKS[dataset][task][step]`` is the list of original class ids introduced at ``step``; background (0) belongs
to step 0. The order of the ids inside a list matters: the remapped (model) index of a class is its position in
``[0] + labels_old + labels`` (see ``dataset/incremental.py``), which is what makes permuted tasks like ``15-1a``
differ from ``15-1``.

The permuted VOC 15-1 orders are the reference's (PLOP's ``tasks.py``, identical in AWT; behaviour notes 11.1):
AWT's ``15-1a`` ... ``15-1j`` are PLOP's ``15-5s_b`` ... ``15-5s_k``; PLOP's ``15-5s_l`` ... ``15-5s_w`` exist under
their PLOP names only. PLOP's names are accepted as aliases (``15-5s`` is ``15-1``). The AWT paper's ten-order
ablation is ``PAPER_ORDERS``: ``15-1`` and the lettered orders without ``15-1d``.
"""
from __future__ import annotations

from dataclasses import dataclass

from dataset.labelmaps import coco_train_ids
from dataset.weak_shot import weak_shot_split, weak_shot_splits
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


# PLOP's tasks.py (4b4a060), "15-5s_b" ... "15-5s_w": the full order, step 0 first (16 ids incl. 0), then one class
# per step.
_PLOP_ORDERS = {
    "b": [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10],
    "c": [0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7, 12, 14, 6, 1, 2],
    "d": [0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17, 6, 5, 13, 9, 4],
    "e": [0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17, 15, 18, 6, 11, 20],
    "f": [0, 7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18, 8, 6, 10, 19, 17],
    "g": [0, 7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16, 12, 8, 6, 2, 13],
    "h": [0, 12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11, 13, 2, 20, 17, 1],
    "i": [0, 13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6, 2, 18, 9, 17, 1],
    "j": [0, 1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19, 3, 4, 17, 12, 13],
    "k": [0, 16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15, 4, 2, 10, 8, 17],
    "l": [0, 10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12, 2, 18, 20, 13, 5],
    "m": [0, 18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2, 5, 11, 20, 16, 19],
    "n": [0, 5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20, 1, 12, 11, 6, 17],
    "o": [0, 9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6, 14, 19, 11, 2, 3],
    "p": [0, 9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6, 14, 19, 1, 7, 3],
    "q": [0, 3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6, 12, 19, 1, 7, 9],
    "r": [0, 3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19, 12, 6, 18, 10, 20],
    "s": [0, 3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19, 15, 13, 18, 10, 8],
    "t": [0, 3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19, 14, 6, 12, 10, 4],
    "u": [0, 3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10, 1, 2, 12, 19, 5],
    "v": [0, 1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10, 3, 15, 13, 11, 7],
    "w": [0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10, 3, 15, 6, 5, 17],
}
# AWT's names: 15-1a ... 15-1j = PLOP's 15-5s_b ... 15-5s_k.
_AWT_ORDER_NAMES = {f"15-1{awt}": f"15-5s_{plop}" for awt, plop in zip("abcdefghij", "bcdefghijk")}
_VOC_ORDERS = {**{name: _PLOP_ORDERS[plop[-1]] for name, plop in _AWT_ORDER_NAMES.items()},
               **{f"15-5s_{k}": seq for k, seq in _PLOP_ORDERS.items() if f"15-5s_{k}" not in _AWT_ORDER_NAMES.values()}}

ALL_ORDERS = ("15-1",) + tuple(_AWT_ORDER_NAMES)  # the default order and AWT's ten lettered ones
PAPER_ORDERS = tuple(o for o in ALL_ORDERS if o != "15-1d")  # AWT supplementary: 15-1 and a, b, c, e ... j
ORDER_SETS = {"paper": PAPER_ORDERS, "all": ALL_ORDERS}  # what run_orders.sh and report.py average over

TASKS: dict[str, dict[str, dict[int, list[int]]]] = {
    "voc": {
        "offline": _steps(range(21)),
        "19-1": _steps(range(20), [20]),
        "15-5": _steps(range(16), range(16, 21)),
        "10-10": _steps(range(11), range(11, 21)),  # WILSON's second weak setting
        "15-1": _base_then_singles(15, 20),
        "10-1": _base_then_singles(10, 20),
        "5-3": _base_then_chunks(5, 20, 3),
        "5-1": _base_then_singles(5, 20),
        "2-1": _base_then_singles(2, 20),  # SSUL's longest VOC task
        **{name: _order(seq) for name, seq in _VOC_ORDERS.items()},
    },
    "ade": {
        "offline": _steps(range(151)),
        "100-50": _steps(range(101), range(101, 151)),
        "100-10": _base_then_chunks(100, 150, 10),
        "100-5": _base_then_chunks(100, 150, 5),
        "50": _steps(range(51), range(51, 101), range(101, 151)),
    },
    # Domain-incremental (PLOP's cityscapes_domain): the ids are cities (DOMAIN_CITIES), the 19 classes stay.
    "cityscapes_domain": {
        "offline": _steps(range(21)),
        "11-5": _steps(range(11), range(11, 16), range(16, 21)),
        "11-1": _base_then_singles(10, 20),
        "1-1": _steps(*[[c] for c in range(21)]),
    },
    "cityscapes": {
        "offline": _steps(range(20)),
        "14-1": _base_then_singles(14, 19),
        "14-5": _steps(range(15), range(15, 20)),
        "18-1": _steps(range(19), [19]),
        "10-1": _base_then_singles(10, 19),
    },
}

# WILSON's COCO-to-VOC split (its tasks.py, COCO category ids; converted to this framework's COCO train ids): step 0
# = background and the 60 COCO classes that are not VOC classes, step 1 = the 20 VOC classes.
_COCO_NOT_VOC = coco_train_ids([0, 8, 10, 11, 13, 14, 15, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
                                41, 42, 43, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 65, 70, 73,
                                74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90])
_COCO_VOC = coco_train_ids([1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72])
TASKS["coco"] = {"offline": _steps(range(81))}  # no COCO class order with a class list was found published
TASKS["coco-voc"] = {"voc": _steps(_COCO_NOT_VOC, _COCO_VOC)}
TASKS["coco_stuff_10k"] = {"offline": _steps(range(171))}  # no background class: id 0 is "person"

# Weak-shot tasks (SimFormer; dataset/weak_shot.py): one step over every class, the novel ones with image labels only.
for _dataset, _splits in weak_shot_splits().items():
    TASKS[_dataset].update({_name: _steps(range(_split.num_classes)) for _name, _split in _splits.items()})

# Alternative names accepted on the command line; caches and logs use the canonical name.
ALIASES: dict[str, dict[str, str]] = {
    "voc": {"15-5s": "15-1", **{plop: awt for awt, plop in _AWT_ORDER_NAMES.items()}},  # PLOP's task names
    "ade": {"50-50": "50"},
    "cityscapes": {},
    "cityscapes_domain": {},
    "coco": {},
    "coco-voc": {},
    "coco_stuff_10k": {},
}
# Datasets whose steps add domains (cities) instead of classes: the model keeps one classifier of this many classes.
DOMAIN_CLASSES: dict[str, int] = {"cityscapes_domain": 19}


@dataclass(frozen=True)
class CrossDataset:
    """A task whose steps read different datasets in one label space. ``sources``: source name -> reader name (the
    names ``--data_roots`` uses); ``train``: the source of each step's training and validation images; ``tests``:
    the sources whose val split tests the steps from the one given on (a test set without any class learnt so far
    would be empty), the first one in the run's results CSV, each other one in its own CSV
    ``..._{name}@{source}.csv``."""

    space: str  # the reader whose classes the model predicts
    sources: dict[str, str]
    train: tuple[str, ...]
    tests: tuple[tuple[str, int], ...]  # (source, first step it tests)
    disjoint: bool = True  # the protocol is the disjoint filter (--overlap refused): what makes step 0 VOC-free


# COCO-to-VOC (WILSON): step 0 on COCO (images holding a VOC class are dropped: the disjoint filter sees them as
# future classes), step 1 on VOC train_aug in COCO's ids; COCO val tests every step, VOC val (which holds VOC classes
# only) the steps from 1 on.
CROSS_DATASETS: dict[str, CrossDataset] = {
    "coco-voc": CrossDataset(space="coco", sources={"coco": "coco", "voc": "voc_as_coco"}, train=("coco", "voc"),
                             tests=(("coco", 0), ("voc", 1))),
}
# Flags a dataset sets unless given (the reference's argument parser forced them: WILSON's modify_command_options).
DATASET_DEFAULTS: dict[str, dict[str, object]] = {
    "coco-voc": {"backbone": "wider_resnet38_a2", "output_stride": 8, "crop_size": 448, "crop_size_val": 512},
}


def train_source(dataset: str, step: int) -> str:
    """The source of ``step``'s training and validation images (the dataset itself unless it is cross-dataset)."""
    cross = CROSS_DATASETS.get(dataset)
    return dataset if cross is None else cross.train[min(step, len(cross.train) - 1)]


def test_sources(dataset: str, step: int | None = None) -> dict[str, str]:
    """``{source: reader}`` of the test sets (of ``step``: those that test it), the first one the run's results CSV
    (``{dataset: dataset}`` for a dataset of one source)."""
    cross = CROSS_DATASETS.get(dataset)
    if cross is None:
        return {dataset: dataset}
    return {name: cross.sources[name] for name, first in cross.tests if step is None or step >= first}


def first_test_source(dataset: str) -> str:
    """The test source whose results go to the run's own CSV (the dataset itself unless it is cross-dataset)."""
    return next(iter(test_sources(dataset)))


def extra_test_sources(dataset: str, step: int) -> list[str]:
    """The test sources of ``step`` after the first: each writes ``..._{name}@{source}.csv``."""
    first = first_test_source(dataset)
    return [source for source in test_sources(dataset, step) if source != first]


def data_sources(dataset: str) -> dict[str, str]:
    """``{source: reader}`` of every dataset a run of ``dataset`` reads."""
    cross = CROSS_DATASETS.get(dataset)
    return {dataset: dataset} if cross is None else dict(cross.sources)


def label_space(dataset: str) -> str:
    """The reader whose classes (count, names, palette) the model of ``dataset`` predicts."""
    cross = CROSS_DATASETS.get(dataset)
    return dataset if cross is None else cross.space


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


def is_domain_incremental(dataset: str) -> bool:
    return dataset in DOMAIN_CLASSES


def classes_per_step(dataset: str, task: str, step: int) -> list[int]:
    """Number of classes of each step up to ``step`` included, e.g. VOC 15-1 step 2 -> ``[16, 1, 1]``; a
    domain-incremental dataset has one classifier of all its classes at every step."""
    table = _table(dataset, task, step)
    if dataset in DOMAIN_CLASSES:
        return [DOMAIN_CLASSES[dataset]]
    return [len(table[s]) for s in range(step + 1)]


def new_class_indices(dataset: str, task: str, step: int) -> list[int]:
    """Remapped (model output) indices of the classes introduced at ``step``.

    The remapped space is ``[0] + labels_old + labels`` in order, so the step's classes occupy a contiguous range
    right after all previous ones (step 0: ``0 .. n0-1``, background included)."""
    counts = classes_per_step(dataset, task, step)
    start = sum(counts[:-1])
    return list(range(start, start + counts[-1]))


def order(dataset: str, task: str, step: int) -> list[int]:
    """``[0] + labels_old + labels`` without duplicates: original id at each remapped index (a domain-incremental
    dataset: every class, in id order)."""
    if dataset in DOMAIN_CLASSES:
        _table(dataset, task, step)
        return list(range(DOMAIN_CLASSES[dataset]))
    labels, labels_old = get_task_labels(dataset, task, step)
    return [0] + [c for c in labels_old + labels if c != 0]


def base_classes(dataset: str, task: str) -> list[int]:
    """Original ids of the classes learnt at step 0 (background included): the "old" classes of the papers' tables."""
    if dataset in DOMAIN_CLASSES:
        return list(range(DOMAIN_CLASSES[dataset]))
    return sorted(set(get_task_labels(dataset, task, 0)[0]) | {0})


def score_groups(dataset: str, task: str, step: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The two class groups a weak-shot task reports (``(base, novel)`` remapped indices; its ignored classes in
    neither), or None: every other task reports old (step 0's classes) and new (the later ones)."""
    # looked up by name only: an unknown task is the caller's to refuse, and is no weak-shot task either
    task = ALIASES.get(dataset, {}).get(task, task)
    split = weak_shot_split(dataset, task)
    if split is None:
        return None
    index = {c: i for i, c in enumerate(order(dataset, task, step))}
    return tuple(index[c] for c in split.base), tuple(index[c] for c in split.novel)
