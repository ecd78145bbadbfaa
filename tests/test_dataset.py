import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import READERS, ADEReader, CityscapesReader, IncrementalSegmentation, VOCReader, build_datasets
from dataset.base import full_palette, load_pair
from dataset.incremental import class_presence, filter_images, masking_lut
from dataset.synthetic import generate
from dataset.transform import RandomResizedCrop, eval_preset, train_preset
from utils.errors import UserError

# classes per hand-made label image (0 = background everywhere, 255 on img3)
FIXTURE = [[1], [2], [1, 3], [3, 255], [2, 3]]


def _label(classes, size=8):
    arr = np.zeros((size, size), np.uint8)
    for k, c in enumerate(classes):
        arr[k, :] = c  # one row per class, the rest is background
    return arr


@pytest.fixture()
def voc_root(tmp_path):
    root = tmp_path / "PascalVOC12"
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (root / sub).mkdir(parents=True)
    lines = []
    for i, classes in enumerate(FIXTURE):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "JPEGImages" / f"x{i}.jpg")
        Image.fromarray(_label(classes)).save(root / "SegmentationClassAug" / f"x{i}.png")
        lines.append(f"/JPEGImages/x{i}.jpg /SegmentationClassAug/x{i}.png")
    for name in ("train_aug.txt", "val.txt"):
        (root / "splits" / name).write_text("\n".join(lines) + "\n")
    return str(root)


def _ds(root, **kw):
    kw.setdefault("labels_old", [1])
    kw.setdefault("labels", [2])
    return IncrementalSegmentation(VOCReader(root, "train"), **kw)


def _classes(ds, i):
    return sorted(torch.unique(ds[i][1]).tolist())


def test_filter_overlap_vs_disjoint(voc_root):
    assert _ds(voc_root, overlap=True).idxs.tolist() == [1, 4]
    assert _ds(voc_root, overlap=False).idxs.tolist() == [1]


def test_filter_is_pure():
    presence = np.zeros((2, 256), bool)
    presence[0, [0, 2]] = presence[1, [0, 2, 3]] = True
    labels, labels_old, before = [0, 2], [1], presence.copy()
    assert filter_images(presence, labels, labels_old, overlap=False).tolist() == [0]
    assert labels == [0, 2] and labels_old == [1] and (presence == before).all()


def test_training_masking_current(voc_root):
    ds = _ds(voc_root, overlap=True)
    item_img, item_lbl = ds[1]  # x4: classes 0, 2, 3 -> 3 is future -> 0
    assert item_img.dtype == torch.uint8 and item_img.shape == (3, 8, 8)  # normalised on the device
    assert item_lbl.dtype == torch.uint8 and _classes(ds, 1) == [0, 2]
    old = _ds(voc_root, labels_old=[2], labels=[1], overlap=True)  # x2: 1 current (index 2), 3 future
    assert old.idxs.tolist() == [0, 2] and _classes(old, 1) == [0, 2]


def test_masking_variants_and_permuted_order(voc_root):
    ds = _ds(voc_root, labels_old=[3], labels=[1], masking="current+old")  # order [0, 3, 1]
    lbl = ds[1][1]  # x2: row0 = 1, row1 = 3
    assert lbl[0, 0] == 2 and lbl[1, 0] == 1 and lbl[5, 5] == 0
    new = _ds(voc_root, labels_old=[3], labels=[1], masking="new")
    lbl = new[1][1]
    assert lbl[0, 0] == 2 and lbl[1, 0] == 255 and lbl[5, 5] == 0
    with pytest.raises(UserError, match="not implemented"):
        _ds(voc_root, masking="all")


def test_lut_keeps_ignore():
    lut = masking_lut([0, 5], [1, 2, 3], "current")
    assert lut[255] == 255 and lut[5] == 4 and lut[2] == 0 and lut[7] == 0 and lut.dtype == torch.uint8
    assert masking_lut([5], [], "new")[7] == 255


def test_test_set_cumulative(voc_root):
    ds = _ds(voc_root, labels=[1, 2], labels_old=[], overlap=True)
    assert ds.idxs.tolist() == [0, 1, 2, 4]
    assert _classes(ds, 2) == [0, 1]  # x2: 3 unseen -> 0
    ign = _ds(voc_root, labels=[3], labels_old=[], overlap=True)
    assert 255 in _classes(ign, 1)


def test_empty_step_is_user_error(voc_root):
    with pytest.raises(UserError, match="no image left for voc"):
        _ds(voc_root, labels=[4], labels_old=[])


def test_index_and_presence_caches(voc_root, tmp_path):
    path = str(tmp_path / "cache" / "voc" / "t" / "train-1.npy")
    ds = _ds(voc_root, idxs_path=path, presence_dir=str(tmp_path / "cache" / "voc"))
    assert os.path.isfile(path) and np.load(path).tolist() == ds.idxs.tolist()
    assert any(f.startswith("classes-train-") for f in os.listdir(tmp_path / "cache" / "voc"))
    np.save(path, np.array([4], np.int64))  # a cached file is read back, not recomputed
    assert _ds(voc_root, idxs_path=path).idxs.tolist() == [4]
    np.save(path, np.array([99], np.int64))
    with pytest.raises(UserError, match="delete it"):
        _ds(voc_root, idxs_path=path)


def test_presence_cache_reused(voc_root, tmp_path, monkeypatch):
    reader = VOCReader(voc_root, "train")
    first = class_presence(reader, str(tmp_path))
    import dataset.incremental as inc
    inc._PRESENCE_MEMO.clear()
    monkeypatch.setattr(inc, "label_presence", lambda *a: pytest.fail("re-read a label"))
    assert (class_presence(reader, str(tmp_path)) == first).all()


def test_reader_errors(tmp_path, voc_root):
    with pytest.raises(UserError, match="--layout voc"):
        VOCReader(str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match="--layout ade"):
        ADEReader(str(tmp_path), "train")
    with pytest.raises(UserError, match="--layout cityscapes"):
        CityscapesReader(str(tmp_path), "val")
    os.remove(os.path.join(voc_root, "JPEGImages", "x3.jpg"))
    os.remove(os.path.join(voc_root, "SegmentationClassAug", "x4.png"))
    with pytest.raises(UserError, match=r"2 listed file\(s\) do not exist, first .*x3.jpg"):
        VOCReader(voc_root, "train")


def test_load_pair_errors(tmp_path):
    img = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    small = tmp_path / "s.png"
    Image.fromarray(np.zeros((4, 8), np.uint8)).save(small)
    with pytest.raises(UserError, match="same size"):
        load_pair(str(img), str(small), None, 21)
    bad = tmp_path / "b.png"
    Image.fromarray(np.full((8, 8), 30, np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"b.png.*\[30\]"):
        load_pair(str(img), str(bad), None, 21)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    with pytest.raises(UserError, match="single-channel"):
        load_pair(str(img), str(rgb), None, 21)
    junk = tmp_path / "j.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot decode image"):
        load_pair(str(junk), str(bad), None, 21)


def test_palette_mode_labels_and_colorize(tmp_path):
    img = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    lbl = Image.fromarray(_label([5, 255])).convert("P")
    lbl.putpalette(full_palette(VOCReader.PALETTE).ravel().tolist())
    lbl.save(tmp_path / "p.png")
    _, out = load_pair(str(img), str(tmp_path / "p.png"), None, 21)
    assert out.mode == "L" and np.asarray(out)[0, 0] == 5 and np.asarray(out)[1, 0] == 255
    for reader in READERS.values():
        assert reader.PALETTE.shape == (reader.NUM_CLASSES, 3) and len(reader.CLASS_NAMES) == reader.NUM_CLASSES
        assert reader.colorize(np.array([[0, 255]], np.uint8)).shape == (1, 2, 3)


def test_cityscapes_lut():
    lut = CityscapesReader.LABEL_LUT
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    expected = {0: 0, 7: 1, 8: 2, 11: 3, 12: 4, 13: 5, 17: 6, 19: 7, 20: 8, 21: 9, 22: 10, 23: 11, 24: 12, 25: 13,
                26: 14, 27: 15, 28: 16, 31: 17, 32: 18, 33: 19}
    for raw in range(256):
        assert lut[raw] == expected.get(raw, 255)


def test_transforms_shapes_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    lbl = Image.fromarray(np.random.default_rng(1).choice([0, 3, 255], (40, 60)).astype(np.uint8))
    torch.manual_seed(3)
    a = train_preset(24)(img, lbl)
    torch.manual_seed(3)
    b = train_preset(24)(img, lbl)
    assert a[0].shape == (3, 24, 24) and a[1].shape == (24, 24) and a[1].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(torch.unique(a[1]).tolist()) <= {0, 3, 255}  # nearest: no blended ids
    e = eval_preset(32, True)(img, lbl)
    assert e[0].shape == (3, 32, 32)
    assert eval_preset(32, False)(img, lbl)[0].shape == (3, 40, 60)
    torch.manual_seed(0)
    for _ in range(50):
        top, left, h, w = RandomResizedCrop(16).get_params(60, 40)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60


def test_build_datasets_voc_synthetic(tmp_path):
    root = str(tmp_path / "voc")
    generate(root, "voc", size=32, n_train=40, n_val=30, seed=0)
    cache = str(tmp_path / "data")
    train, val, test = build_datasets(dataset="voc", root=root, task="15-1", step=1, overlap=False, crop_size=24,
                                      cache_root=cache)
    for name in ("train-1", "val-1", "test_on_val-1"):
        assert os.path.isfile(os.path.join(cache, "voc", "15-1", name + ".npy"))
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.uint8
    assert set(torch.unique(y).tolist()) <= {0, 16, 255}
    assert all(set(torch.unique(val[i][1]).tolist()) <= {0, 16, 255} for i in range(len(val)))
    seen = set()
    for i in range(len(test)):
        seen |= set(torch.unique(test[i][1]).tolist())
    assert seen <= set(range(17)) | {255} and len(seen) > 3


def test_build_datasets_cityscapes_test_on_val_and_ade_relative_root(tmp_path, monkeypatch):
    generate(str(tmp_path / "cs"), "cityscapes", size=24, n_train=30, n_val=25, seed=1)
    full = build_datasets(dataset="cityscapes", root=str(tmp_path / "cs"), task="14-1", step=0, overlap=True,
                          crop_size=16, cache_root=str(tmp_path / "d"))
    tov = build_datasets(dataset="cityscapes", root=str(tmp_path / "cs"), task="14-1", step=0, overlap=True,
                         crop_size=16, cache_root=str(tmp_path / "d"), test_on_val=True)
    assert len(tov[0]) == int(0.8 * len(full[0])) and len(tov[2]) == len(full[2]) - int(0.8 * len(full[2]))
    assert set(torch.unique(full[2][0][1]).tolist()) <= set(range(15)) | {255}
    generate(str(tmp_path / "ade"), "ade", size=16, n_train=150, n_val=150, seed=0)
    monkeypatch.chdir(tmp_path)
    assert len(ADEReader("ade", "val")) == 150 and len(ADEReader("ade/ADEChallengeData2016", "train")) == 150


def test_images_to_device_normalises_like_the_reference():
    """uint8 batches are normalised on the device with the reference's arithmetic (ToTensor: /255, then
    Normalize: (x - mean) / std, float32), bit for bit; float inputs are taken as already normalised."""
    from dataset.transform import ToTensor, images_to_device, labels_to_device
    from utils.constants import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    img, lbl = ToTensor()(Image.fromarray(pixels), Image.fromarray(pixels[..., 0]))
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 10) and lbl.dtype == torch.uint8
    x = images_to_device(img[None], "cpu")
    ref = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(x[0], ref)
    cl = images_to_device(img[None], None, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    assert images_to_device(x, "cpu") is x  # already a model input
    with pytest.raises(UserError, match="uint8 pixels"):
        images_to_device(img[None].to(torch.int16), "cpu")
    y = labels_to_device(lbl[None], "cpu")
    assert y.dtype == torch.int64 and torch.equal(y[0], torch.from_numpy(pixels[..., 0]).long())
