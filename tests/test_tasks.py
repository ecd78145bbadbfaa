import pytest

from dataset.readers import space_reader
from dataset.tasks import (TASKS, canonical_task, classes_per_step, get_task_labels, is_domain_incremental,
                           new_class_indices, num_steps, order, task_names)
from utils.errors import UserError

# class-incremental tables (domain-incremental ones hold cities: tests/test_protocols.py)
ALL = [(d, t) for d in TASKS if not is_domain_incremental(d) for t in TASKS[d]]


@pytest.mark.parametrize("dataset,task", ALL)
def test_steps_partition_the_classes(dataset, task):
    n = space_reader(dataset).NUM_CLASSES
    table = TASKS[dataset][task]
    assert sorted(table) == list(range(len(table)))
    seen = [c for step in table.values() for c in step]
    assert sorted(seen) == list(range(n)), "each class exactly once"
    assert 0 in table[0]
    assert all(0 not in table[s] for s in table if s > 0)
    assert 255 not in seen


@pytest.mark.parametrize("dataset,task", ALL)
def test_api_consistency(dataset, task):
    steps = num_steps(dataset, task)
    for step in range(steps):
        labels, labels_old = get_task_labels(dataset, task, step)
        assert not set(labels) & set(labels_old)
        counts = classes_per_step(dataset, task, step)
        assert len(counts) == step + 1 and counts[-1] == len(labels) and sum(counts[:-1]) == len(labels_old)
        new = new_class_indices(dataset, task, step)
        assert new == list(range(sum(counts[:-1]), sum(counts)))
        assert [order(dataset, task, step)[i] for i in new if i > 0] == [c for c in labels if c != 0]


def test_known_shapes():
    assert num_steps("voc", "15-1") == 6 and num_steps("voc", "10-1") == 11 and num_steps("voc", "5-1") == 16
    assert num_steps("voc", "5-3") == 6 and num_steps("ade", "100-10") == 6 and num_steps("ade", "100-5") == 11
    assert num_steps("ade", "50") == 3 and num_steps("cityscapes", "10-1") == 10
    assert classes_per_step("voc", "15-1", 2) == [16, 1, 1]
    assert get_task_labels("voc", "15-1a", 0)[0] == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11]
    assert [get_task_labels("voc", "15-1a", s)[0] for s in range(1, 6)] == [[17], [3], [6], [18], [10]]
    assert new_class_indices("voc", "15-1a", 3) == [18]
    assert new_class_indices("ade", "100-10", 1) == list(range(101, 111))


def test_voc_orders_distinct():
    orders = {tuple(c for s in TASKS["voc"][f"15-1{x}"].values() for c in s) for x in "abcdefghij"}
    assert len(orders) == 10


def test_alias_and_names():
    assert canonical_task("ade", "50-50") == "50"
    assert get_task_labels("ade", "50-50", 1) == get_task_labels("ade", "50", 1)
    assert "50-50" in task_names("ade") and "15-1j" in task_names("voc")


def test_lists_are_copies():
    labels, labels_old = get_task_labels("voc", "15-1", 1)
    labels.append(99)
    labels_old.clear()
    assert get_task_labels("voc", "15-1", 1) == ([16], list(range(16)))


@pytest.mark.parametrize("args,needle", [(("mapillary", "15-1", 0), "valid datasets"), (("voc", "15-2", 0), "15-1a"),
                                         (("voc", "15-1", 6), "0..5"), (("ade", "50", -1), "0..2")])
def test_unknown_names(args, needle):
    with pytest.raises(UserError, match=needle):
        get_task_labels(*args)
