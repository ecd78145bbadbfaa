"""The weak incremental step protocol (WILSON, weak-steps.md 1.1-1.2): the training set of a weak step yields no pixel
label (all 255) and never opens a label file; its image labels are the step's classes present in the full ground
truth (or read from a WILSON-style array); single-class steps and options that need pixel labels are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dataset.base as base
from dataset.incremental import WeakSegmentation, build_datasets
from dataset.synthetic import generate
from dataset.tasks import get_task_labels
from experiment.config import parse_config
from experiment.validate import _check_protocol
from methods import build_method
from utils.errors import UserError


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("weak") / "voc"
    generate(str(root), "voc", size=24, n_train=60, n_val=20, seed=1)
    return str(root)


def _build(voc, tmp_path, task="15-5", step=1, **kwargs):
    return build_datasets(dataset="voc", root=voc, task=task, step=step, overlap=True, crop_size=24,
                          cache_root=str(tmp_path / "cache"), weak=True, **kwargs)[0]


def _presence_from_files(train) -> np.ndarray:
    return np.stack([np.bincount(np.asarray(Image.open(train.reader.samples[int(i)][1])).ravel(), minlength=256) > 0
                     for i in train.idxs])


def test_no_pixel_label_is_read_and_image_labels_are_the_full_ground_truth(voc, tmp_path, monkeypatch):
    train = _build(voc, tmp_path)
    assert isinstance(train, WeakSegmentation)
    expected = _presence_from_files(train)  # read here, before label files are forbidden
    labels, labels_old = get_task_labels("voc", "15-5", 1)
    decoded = []
    original = base._decode

    def spy(path, what):
        decoded.append(what)
        if what == "label":
            raise AssertionError(f"a weak step opened the label file {path}")
        return original(path, what)

    monkeypatch.setattr(base, "_decode", spy)
    for index in range(len(train)):
        image, label, aux = train[index]
        assert label.dtype == torch.uint8 and label.shape == image.shape[1:] and (label == 255).all()
        vector = aux["img_labels"].numpy()
        assert vector.shape == (len(labels_old) + len(labels) - 1,)  # remapped classes 1..C-1
        assert not vector[:len(labels_old) - 1].any(), "old classes are never labelled"
        assert vector[len(labels_old) - 1:].tolist() == [float(expected[index, c]) for c in labels]
    assert decoded and set(decoded) == {"image"}


def test_step0_and_evaluation_keep_pixel_labels(voc, tmp_path):
    step0 = _build(voc, tmp_path, step=0)
    assert not isinstance(step0, WeakSegmentation)
    train, val, test = build_datasets(dataset="voc", root=voc, task="15-5", step=1, overlap=True, crop_size=24,
                                      cache_root=str(tmp_path / "cache"), weak=True)
    assert isinstance(train, WeakSegmentation)
    assert not isinstance(val, WeakSegmentation) and not isinstance(test, WeakSegmentation)
    assert any((val[i][1] != 255).any() for i in range(len(val)))


def test_image_labels_from_a_wilson_array(voc, tmp_path):
    train = _build(voc, tmp_path)
    presence = np.zeros((len(train.reader), 20), dtype=np.float32)
    rows = np.stack([np.bincount(np.asarray(Image.open(lbl)).ravel(), minlength=256) > 0
                     for _, lbl in train.reader.samples])
    presence[:] = rows[:, 1:21]
    path = tmp_path / "voc_1h_labels_train.npy"
    np.save(path, presence)
    from_file = _build(voc, tmp_path, img_labels_file=str(path))
    assert np.array_equal(from_file.img_labels, train.img_labels)
    presence[:, 15] = 1 - presence[:, 15]  # the file wins over the label files
    np.save(path, presence)
    changed = _build(voc, tmp_path, img_labels_file=str(path))
    assert not np.array_equal(changed.img_labels, train.img_labels)
    np.save(path, presence[:, :19])
    with pytest.raises(UserError, match=r"shape \(60, 19\), expected \(60, 20\)"):
        _build(voc, tmp_path, img_labels_file=str(path))


def test_old_labels_name_the_old_classes_present_as_wilson_no_mask(voc, tmp_path):
    """WILSON's Table 5 variant (--weak_old_labels, or --no_mask with --weakly): old entries = presence too."""
    train = _build(voc, tmp_path, weak_old_labels=True)
    expected = _presence_from_files(train)
    labels, labels_old = get_task_labels("voc", "15-5", 1)
    vectors = np.stack([train[i][2]["img_labels"].numpy() for i in range(len(train))])
    order = [c for c in labels_old if c != 0] + list(labels)
    assert vectors.tolist() == [[float(expected[i, c]) for c in order] for i in range(len(train))]
    assert vectors[:, :len(labels_old) - 1].any()  # some old class is present somewhere: the check can fail
    base_args = ["--dataset", "voc", "--task", "15-5", "--step", "1", "--data_root", voc]
    assert parse_config(base_args + ["--weakly", "--no_mask"]).no_mask  # accepted with WILSON's meaning
    with pytest.raises(UserError, match="--no_mask is not supported"):
        _check_protocol(parse_config(base_args + ["--no_mask"]))


def test_a_single_class_step_is_refused_unless_asked(voc, tmp_path):
    with pytest.raises(UserError, match="single-class step.*--weak_allow_single"):
        _build(voc, tmp_path, task="15-1", step=1)
    train = _build(voc, tmp_path, task="15-1", step=1, weak_allow_single=True)
    assert train.img_labels[:, -1].all()


def test_flags_that_need_pixel_labels_or_weak_steps_are_refused(voc):
    base_args = ["--dataset", "voc", "--task", "15-5", "--step", "0", "1", "--data_root", voc]
    with pytest.raises(UserError, match="--cross_val"):
        _check_protocol(parse_config(base_args + ["--weakly", "--cross_val"]))
    with pytest.raises(UserError, match="add --weakly"):
        _check_protocol(parse_config(base_args + ["--weak_allow_single"]))
    with pytest.raises(UserError, match="MiB cannot use: it trains on pixel labels"):
        build_method(parse_config(base_args + ["--weakly", "--method", "MiB"]))
    stack = build_method(parse_config(base_args + ["--weakly", "--att", "25", "--mask_att"]))
    assert stack.names == ["WILSON", "AWT"]  # AWT at weak steps takes its masks from the image labels


def test_image_labels_from_the_crop_list_the_classes_left_in_it(voc, tmp_path):
    """--img_labels_from crop (SimFormer's rule): presence in the augmented crop (here a fixed corner crop, so the
    expectation is exact); the item's label stays all 255."""
    from dataset.transform import ToTensor
    crop = _build(voc, tmp_path, img_labels_from="crop")
    crop.transform = lambda image, label: ToTensor()(image.crop((0, 0, 9, 9)), label.crop((0, 0, 9, 9)))
    labels, labels_old = get_task_labels("voc", "15-5", 1)
    differs = 0
    for index in range(len(crop)):
        image, label, aux = crop[index]
        present = set(np.unique(np.asarray(crop.reader.load(int(crop.idxs[index]))[1])[:9, :9]).tolist())
        assert (label == 255).all() and label.shape == image.shape[1:] == (9, 9)
        assert aux["img_labels"][len(labels_old) - 1:].tolist() == [float(c in present) for c in labels]
        differs += aux["img_labels"].tolist() != crop.img_labels[index].tolist()
    assert differs > 0  # some class was cropped out somewhere: the two rules differ on this data
    with pytest.raises(UserError, match="add --weakly"):
        _check_protocol(parse_config(["--dataset", "voc", "--task", "15-5", "--step", "1", "--data_root", voc,
                                      "--img_labels_from", "crop"]))
