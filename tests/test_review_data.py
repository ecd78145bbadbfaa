"""Data-layer review: task tables, incremental semantics, caches, transforms and seeded loaders against
reference/behaviour.md sections 1.5, 4 and 6.2 (see docs/deviations.md for what differs on purpose)."""
from __future__ import annotations

import math
import os
import random
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset import build_datasets
from dataset.cityscapes import CityscapesReader
from dataset.incremental import filter_images, masking_lut
from dataset.incremental import test_on_val_split as tov_split
from dataset.synthetic import generate
from dataset.tasks import TASKS, get_task_labels, order
from dataset.transform import CenterCrop, RandomResizedCrop, Resize
import utils.data as data_mod


# ----------------------------------------------------------------------------------------------- task tables 4.6
def _r(a, b):
    return list(range(a, b + 1))


EXPECTED = {
    "voc": {
        "offline": [_r(0, 20)],
        "19-1": [_r(0, 19), [20]],
        "15-5": [_r(0, 15), _r(16, 20)],
        "15-1": [_r(0, 15)] + [[c] for c in _r(16, 20)],
        "10-1": [_r(0, 10)] + [[c] for c in _r(11, 20)],
        "5-3": [_r(0, 5), _r(6, 8), _r(9, 11), _r(12, 14), _r(15, 17), _r(18, 20)],
        "5-1": [_r(0, 5)] + [[c] for c in _r(6, 20)],
        "15-1a": [[0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17], [3], [6], [18], [10]],
    },
    "ade": {
        "offline": [_r(0, 150)],
        "100-50": [_r(0, 100), _r(101, 150)],
        "100-10": [_r(0, 100)] + [_r(s, s + 9) for s in range(101, 151, 10)],
        "100-5": [_r(0, 100)] + [_r(s, s + 4) for s in range(101, 151, 5)],
        "50": [_r(0, 50), _r(51, 100), _r(101, 150)],
    },
    "cityscapes": {
        "offline": [_r(0, 19)],
        "14-1": [_r(0, 14)] + [[c] for c in _r(15, 19)],
        "14-5": [_r(0, 14), _r(15, 19)],
        "18-1": [_r(0, 18), [19]],
        "10-1": [_r(0, 10)] + [[c] for c in _r(11, 19)],
    },
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_task_tables_exact(dataset):
    for task, steps in EXPECTED[dataset].items():
        got = TASKS[dataset][task]
        assert [got[s] for s in range(len(got))] == steps, (dataset, task)
    assert len(TASKS["voc"]["10-1"]) == 11 and len(TASKS["voc"]["5-1"]) == 16
    assert len(TASKS["ade"]["100-10"]) == 6 and len(TASKS["ade"]["100-5"]) == 11
    assert len(TASKS["cityscapes"]["10-1"]) == 10
    for name in [f"15-1{c}" for c in "abcdefghij"]:  # every order: 16 base ids incl. 0, then 5 single steps
        t = TASKS["voc"][name]
        assert len(t) == 6 and len(t[0]) == 16 and t[0][0] == 0 and sorted(sum(t.values(), [])) == _r(0, 20)


def test_order_and_inverted_order_15_1a():
    labels, labels_old = get_task_labels("voc", "15-1a", 2)
    assert labels == [3] and labels_old[:16] == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11]
    assert order("voc", "15-1a", 2) == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3]
    lut = masking_lut(labels, labels_old, "current+old")
    assert lut[12] == 1 and lut[11] == 15 and lut[17] == 16 and lut[3] == 17 and lut[255] == 255
    assert lut[6] == 0 and lut[10] == 0  # future classes -> background


# ----------------------------------------------------------------------------------------------- masking 4.1
def test_masking_variants_exact():
    labels, old = [16, 17], [0, 1, 2, 3]  # old includes bg as get_task_labels returns it
    cur = masking_lut(labels, old, "current")
    cur_old = masking_lut(labels, old, "current+old")
    new = masking_lut(labels, old, "new")
    # current: bg and current classes remapped, old and future -> 0, 255 kept
    assert (cur[0], cur[16], cur[17], cur[1], cur[3], cur[18], cur[255]) == (0, 4, 5, 0, 0, 0, 255)
    # current+old: old GT kept (remapped), future -> 0
    assert (cur_old[1], cur_old[2], cur_old[3], cur_old[16], cur_old[18]) == (1, 2, 3, 4, 0)
    # new: bg and current kept, everything else (old and future) -> 255
    assert (new[0], new[16], new[17], new[1], new[18], new[255]) == (0, 4, 5, 255, 255, 255)


def test_filter_overlap_disjoint_exact():
    presence = np.zeros((5, 256), bool)
    for i, cls in enumerate([[0, 5], [0, 5, 1], [0, 5, 9], [0, 1], [5, 255]]):
        presence[i, cls] = True
    # step: labels [5], old [0, 1]; class 9 is a future class
    assert filter_images(presence, [5], [0, 1], overlap=True).tolist() == [0, 1, 2, 4]
    assert filter_images(presence, [5], [0, 1], overlap=False).tolist() == [0, 1, 4]
    # test set: cumulative labels, no old -> images with >= 1 seen fg class
    assert filter_images(presence, [0, 1, 5], [], overlap=True).tolist() == [0, 1, 2, 3, 4]


def test_test_on_val_split_matches_reference_list_shuffle():
    idxs = list(range(3, 40, 2))  # reference: shuffles a Python list with RandomState(1)
    ref = list(idxs)
    np.random.RandomState(1).shuffle(ref)
    cut = int(0.8 * len(ref))
    assert tov_split(np.array(idxs), True).tolist() == ref[:cut]
    assert tov_split(np.array(idxs), False).tolist() == ref[cut:]


# ----------------------------------------------------------------------------------------------- builder / caches
@pytest.fixture(scope="module")
def voc_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("rv") / "PascalVOC12"
    generate(str(root), "voc", size=16, n_train=60, n_val=40, seed=3)
    return str(root)


def test_cache_paths_overlap_all_splits(voc_small, tmp_path):
    cache = str(tmp_path / "c")
    kw = dict(dataset="voc", root=voc_small, task="15-1", step=1, crop_size=16, cache_root=cache)
    build_datasets(overlap=True, **kw)
    build_datasets(overlap=True, val_on_trainset=True, **kw)
    names = sorted(f for f in os.listdir(os.path.join(cache, "voc", "15-1-ov")) if f.endswith(".npy"))
    assert names == ["test_on_train-1.npy", "test_on_val-1.npy", "train-1.npy", "val-1.npy"]
    assert not os.path.exists(os.path.join(cache, "voc", "15-1"))
    assert np.load(os.path.join(cache, "voc", "15-1-ov", "train-1.npy")).dtype == np.int64


def test_val_and_test_sets_semantics(voc_small, tmp_path):
    train, val, test = build_datasets(dataset="voc", root=voc_small, task="15-1", step=2, overlap=False,
                                      crop_size=16, cache_root=str(tmp_path))
    assert val.reader.split == "val" and test.reader.split == "val" and train.reader.split == "train"
    assert val.labels == [17] and val.labels_old == _r(1, 16) and val.masking == "current"
    assert test.labels == _r(1, 17) and test.labels_old == []
    assert torch.equal(val.lut, train.lut)
    assert int(test.lut[16]) == 16 and int(test.lut[17]) == 17 and int(test.lut[18]) == 0


def test_test_on_val_sides(voc_small, tmp_path):
    kw = dict(dataset="voc", root=voc_small, task="15-5", step=0, overlap=True, crop_size=16,
              cache_root=str(tmp_path))
    full = build_datasets(**kw)
    tov = build_datasets(test_on_val=True, **kw)
    assert tov[0].idxs.tolist() == tov_split(full[0].idxs, True).tolist()
    assert tov[2].idxs.tolist() == tov_split(full[2].idxs, False).tolist()
    assert tov[1].idxs.tolist() == full[1].idxs.tolist()  # the validation set is not split


def test_cross_val_uses_random_80_20_of_train(voc_small, tmp_path):
    """--cross_val (behaviour.md 1.5): validation = random 20 % of the train dataset (torch random_split)."""
    kw = dict(dataset="voc", root=voc_small, task="15-5", step=0, overlap=True, crop_size=16,
              cache_root=str(tmp_path))
    full = build_datasets(**kw)[0]
    train, val, _ = build_datasets(cross_val=True, seed=42, **kw)
    n = len(full)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()  # = random_split after seeding
    cut = int(0.8 * n)
    assert train.idxs.tolist() == full.idxs[perm[:cut]].tolist()
    assert val.idxs.tolist() == full.idxs[perm[cut:]].tolist()
    assert val.reader.split == "train" and torch.equal(val.lut, full.lut)


# ----------------------------------------------------------------------------------------------- readers
def test_cityscapes_lut_complete():
    expected = {0: 0, 7: 1, 8: 2, 11: 3, 12: 4, 13: 5, 17: 6, 19: 7, 20: 8, 21: 9, 22: 10, 23: 11, 24: 12, 25: 13,
                26: 14, 27: 15, 28: 16, 31: 17, 32: 18, 33: 19}
    lut = CityscapesReader.LABEL_LUT
    assert [int(lut[i]) for i in range(256)] == [expected.get(i, 255) for i in range(256)]


def test_voc_listing_leading_slash_and_parent_root(tmp_path):
    from dataset.voc import VOCReader
    root = tmp_path / "PascalVOC12"
    generate(str(root), "voc", size=16, n_train=30, n_val=25, seed=0)
    line = (root / "splits" / "val.txt").read_text().splitlines()[0]
    assert line.startswith("/JPEGImages/") and " /SegmentationClassAug/" in line
    a, b = VOCReader(str(root), "val"), VOCReader(str(tmp_path), "val")
    assert a.samples == b.samples and a.samples[0][0] == os.path.join(str(root), line.split()[0][1:])


# ----------------------------------------------------------------------------------------------- transforms 4.5
def _torchvision_rrc(width, height, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params (v0.15+), verbatim algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_is_torchvision_algorithm():
    rrc = RandomResizedCrop(32)
    assert rrc.scale == (0.5, 2.0) and rrc.ratio == (3 / 4, 4 / 3)
    fallback = 0
    for (w, h) in [(500, 375), (375, 500), (100, 20), (20, 100)]:
        for s in range(150):
            torch.manual_seed(s)
            ours = rrc.get_params(w, h)
            torch.manual_seed(s)
            assert ours == _torchvision_rrc(w, h, (0.5, 2.0), (3 / 4, 4 / 3)), (w, h, s)
            fallback += ours[2:] == (h, w)
    assert fallback > 0  # area fractions > 1 do fall back to the whole (ratio-clamped) image


def test_eval_resize_short_side_and_center_crop():
    img = Image.new("RGB", (50, 30))
    lbl = Image.new("L", (50, 30))
    a, b = Resize(16)(img, lbl)
    assert a.size == (26, 16) and b.size == (26, 16)  # int(16 * 50 / 30) = 26
    c, _ = CenterCrop(16)(a, b)
    assert c.size == (16, 16)


# ----------------------------------------------------------------------------------------------- loaders 6.2
class _RandomItems(Dataset):
    def __len__(self):
        return 13

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(1).item(), random.random(), float(np.random.rand())],
                            dtype=torch.float64)


def _epochs(workers):
    loader = data_mod.build_loader(_RandomItems(), batch_size=4, train=True, num_workers=workers, seed=7)
    out = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_seeded_loader_independent_of_workers_and_state():
    torch.manual_seed(0)
    a = _epochs(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    data_mod.SeededDataset(_RandomItems())[(3, 123)]
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])  # nothing leaks into the caller's RNGs
    torch.manual_seed(99)  # the main-process RNG state does not matter
    b = _epochs(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (12, 4)  # drop_last
    assert not torch.equal(a[0], a[1])
    # a sample's draws are a function of its key only
    ds = data_mod.SeededDataset(_RandomItems())
    assert torch.equal(ds[(5, 11)], ds[(5, 11)]) and not torch.equal(ds[(5, 11)][1:], ds[(5, 12)][1:])


@pytest.mark.parametrize("n,world", [(10, 3), (11, 2), (13, 4), (3, 3)])
def test_ddp_sharding(n, world):
    shards, evals = [], []
    for rank in range(world):
        with mock.patch.object(data_mod, "get_rank", return_value=rank), \
                mock.patch.object(data_mod, "get_world_size", return_value=world):
            sampler = data_mod.EpochSampler(n, shuffle=True, seed=1, drop_last=True)
            sampler.set_epoch(4)
            shards.append([i for i, _ in sampler])
            assert len(sampler) == len(shards[-1])
            evals.append(list(data_mod._EvalShardSampler(n)))
    assert all(len(s) == n // world for s in shards)  # equal per rank -> equal batches under drop_last
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat)  # no duplicate across ranks
    assert sorted(sum(evals, [])) == list(range(n))  # evaluation: every image exactly once


def test_random_resized_crop_is_crop_then_resize():
    """torchvision's ``resized_crop`` on PIL = ``crop`` then ``resize``; PIL's ``resize(box=)`` samples differently
    (labels on small crops, image borders)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (23, 31, 3), dtype=np.uint8))
    lbl = Image.fromarray(rng.integers(0, 20, (23, 31)).astype(np.uint8))
    rrc = RandomResizedCrop((15, 42))
    for s in range(20):
        torch.manual_seed(s)
        top, left, h, w = rrc.get_params(31, 23)
        box = (left, top, left + w, top + h)
        torch.manual_seed(s)
        a, b = rrc(img, lbl)
        assert np.array_equal(np.asarray(a), np.asarray(img.crop(box).resize((42, 15), Image.BILINEAR)))
        assert np.array_equal(np.asarray(b), np.asarray(lbl.crop(box).resize((42, 15), Image.NEAREST)))


def test_caches_follow_regenerated_labels(tmp_path):
    """A dataset regenerated in place with the same file names (synthetic --force --seed N) must not reuse the
    class-presence / index caches of the old labels (docs/deviations.md promises a recompute)."""
    import dataset.incremental as inc
    root, cache = str(tmp_path / "PascalVOC12"), str(tmp_path / "c")
    kw = dict(dataset="voc", root=root, task="15-5", step=1, overlap=False, crop_size=16, cache_root=cache)
    generate(root, "voc", size=16, n_train=40, n_val=30, seed=0)
    build_datasets(**kw)
    generate(root, "voc", size=16, n_train=40, n_val=30, seed=5, force=True)
    inc._PRESENCE_MEMO.clear()
    again = build_datasets(**kw)
    inc._PRESENCE_MEMO.clear()
    fresh = build_datasets(**{**kw, "cache_root": str(tmp_path / "fresh")})
    for a, b in zip(again, fresh):
        assert a.idxs.tolist() == b.idxs.tolist()


def test_cross_val_flag_reaches_the_datasets(voc_small, tmp_path):
    from experiment.builders import build_step_datasets
    from experiment.config import parse_config

    args = ["--data_root", voc_small, "--task", "15-5", "--crop_size", "16", "--cache_root", str(tmp_path),
            "--random_seed", "3"]
    plain = build_step_datasets(parse_config(args), 0)
    crossed = build_step_datasets(parse_config(args + ["--cross_val"]), 0)
    assert plain[1].reader.split == "val" and crossed[1].reader.split == "train"
    assert sorted(crossed[0].idxs.tolist() + crossed[1].idxs.tolist()) == plain[0].idxs.tolist()
    assert len(crossed[0]) == int(0.8 * len(plain[0]))
