import hashlib
import os

import numpy as np
import pytest

from dataset import READERS
from dataset.incremental import class_presence, filter_images
from dataset.synthetic import LAYOUTS, generate, main
from dataset.tasks import CROSS_DATASETS, TASKS, data_sources, get_task_labels, train_source
from utils.errors import UserError

SMALL = {"voc": dict(size=24, n_train=20, n_val=20), "ade": dict(size=16, n_train=150, n_val=150),
         "cityscapes": dict(size=16, n_train=19, n_val=19), "coco": dict(size=16, n_train=80, n_val=80),
         "coco-voc": dict(size=16, n_train=80, n_val=80), "coco_stuff_10k": dict(size=16, n_train=171, n_val=171)}


def _digest(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("syn")
    return {layout: generate(str(base / layout), layout, seed=0, **kw)["root"] for layout, kw in SMALL.items()}


def test_deterministic_bytes(tmp_path):
    a = generate(str(tmp_path / "a"), "voc", size=24, n_train=20, n_val=20, seed=3)["root"]
    b = generate(str(tmp_path / "b"), "voc", size=24, n_train=20, n_val=20, seed=3)["root"]
    c = generate(str(tmp_path / "c"), "voc", size=24, n_train=20, n_val=20, seed=4)["root"]
    assert _digest(a) == _digest(b) and len(_digest(a)) == 3 * 40 + 2 + 1  # images, labels, saliency, 2 splits, marker
    assert _digest(a) != _digest(c)


def test_refuses_overwrite_and_force(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--force"):
        generate(str(root), "voc", size=24, n_train=20, n_val=20)
    assert main([str(root), "--layout", "voc", "--size", "24", "--train", "20", "--val", "20"]) == 2
    generate(str(root), "voc", size=24, n_train=20, n_val=20, force=True)
    assert not (root / "keep.txt").exists() and (root / "splits" / "val.txt").is_file()
    assert sorted(os.listdir(tmp_path)) == ["r"]  # no temporary folder left behind
    with pytest.raises(UserError, match="at least 20"):
        generate(str(tmp_path / "few"), "voc", size=24, n_train=5, n_val=20)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_step_of_every_task_has_images(small_sets, layout):
    for split in ("train", "val"):
        if layout not in CROSS_DATASETS:
            reader = READERS[layout](small_sets[layout], split)
            assert class_presence(reader)[:, 1:reader.NUM_CLASSES].any(axis=0).all(), "every class appears"
        for task, table in TASKS[layout].items():
            for step in table:
                reader = READERS[data_sources(layout)[train_source(layout, step)]](small_sets[layout], split)
                presence = class_presence(reader)
                labels, labels_old = get_task_labels(layout, task, step)
                for overlap in (True, False):
                    kept = filter_images(presence, labels, labels_old, overlap)
                    assert len(kept) > 0, (layout, split, task, step, overlap)


def test_label_conventions(small_sets):
    voc = READERS["voc"](small_sets["voc"], "train")
    assert class_presence(voc)[:, 255].any(), "VOC boundary rings"
    from PIL import Image
    assert Image.open(READERS["voc"](small_sets["voc"], "val").samples[0][1]).mode == "P"
    assert Image.open(voc.samples[0][1]).mode == "L"
    cs = READERS["cityscapes"](small_sets["cityscapes"], "train")
    raw = np.concatenate([np.asarray(Image.open(lbl)).ravel() for _, lbl in cs.samples])
    assert np.isin(raw, [1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]).any(), "ignored raw ids present"
    assert np.isin(raw, [26, 33]).any() and not np.isin(raw, np.arange(34, 256)).any()
    assert class_presence(cs)[:, 255].any() and class_presence(cs)[:, 19].any()


def test_default_voc_is_separable_by_colour_but_textured(tmp_path):
    root = generate(str(tmp_path / "v"), "voc", size=48, n_train=200, n_val=20, seed=0)["root"]
    reader = READERS["voc"](root, "train")
    feats, ys, spread = [], [], []
    for i in range(len(reader)):
        image, label = reader.load(i)
        a, lab = np.asarray(image, np.float32), np.asarray(label)
        for c in np.unique(lab):
            mask = lab == c
            if c in (0, 255) or mask.sum() < 20:
                continue
            feats.append(a[mask].mean(0))
            ys.append(c)
            spread.append(a[mask].std(0).mean())
    feats, ys = np.array(feats), np.array(ys)
    centroids = np.array([feats[ys == c].mean(0) for c in range(1, 21)])
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), 1) + 1
    assert (pred == ys).mean() > 0.85, "per-object mean colours separate the classes"
    assert np.mean(spread) > 10, "classes are textured, not flat colours"
