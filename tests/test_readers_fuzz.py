"""load_pair never raises anything but UserError, whatever the bytes on disk."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dataset.base import load_pair
from dataset.cityscapes import CityscapesReader
from utils.errors import UserError

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encode(array, fmt, mode=None):
    buf = io.BytesIO()
    image = Image.fromarray(array.astype(np.uint16) * 2 if mode == "I;16" else array)
    if mode and mode != "I;16":
        image = image.convert(mode)
    image.save(buf, format=fmt)
    return buf.getvalue()


def _check(img_path, lbl_path, lut, num_classes):
    try:
        image, label = load_pair(str(img_path), str(lbl_path), lut, num_classes)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    arr = np.asarray(label)
    assert image.mode == "RGB" and label.mode == "L" and image.size == label.size
    assert ((arr < num_classes) | (arr == 255)).all()
    return arr


@FUZZ
@given(h=st.integers(1, 12), w=st.integers(1, 12), lh=st.integers(1, 12), lw=st.integers(1, 12),
       values=st.lists(st.integers(0, 255), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["L", "P", "RGB", "I;16"]), cityscapes=st.booleans())
def test_random_labels(tmp_path, h, w, lh, lw, values, seed, mode, cityscapes):
    rng = np.random.default_rng(seed)
    img, lbl = tmp_path / "i.jpg", tmp_path / "l.png"
    img.write_bytes(_encode(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "JPEG"))
    lbl.write_bytes(_encode(rng.choice(values, (lh, lw)).astype(np.uint8), "PNG", mode))
    lut, n = (CityscapesReader.LABEL_LUT, 20) if cityscapes else (None, 21)
    arr = _check(img, lbl, lut, n)
    if arr is not None:
        assert (h, w) == (lh, lw) and mode != "RGB"


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["JPEG", "PNG"]), target=st.sampled_from(["image", "label"]),
       truncate=st.booleans())
def test_corrupted_files(tmp_path, data, fmt, target, truncate):
    good_img = _encode(np.full((8, 8, 3), 100, np.uint8), fmt)
    good_lbl = _encode(np.full((8, 8), 3, np.uint8), "PNG")
    blob = bytearray(good_img if target == "image" else good_lbl)
    if truncate:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    img, lbl = tmp_path / "i.img", tmp_path / "l.png"
    img.write_bytes(bytes(blob) if target == "image" else good_img)
    lbl.write_bytes(bytes(blob) if target == "label" else good_lbl)
    _check(img, lbl, None, 21)


@FUZZ
@given(payload=st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path, payload):
    img, lbl = tmp_path / "i.jpg", tmp_path / "l.png"
    img.write_bytes(payload)
    lbl.write_bytes(payload)
    _check(img, lbl, None, 151)


def _presence(lbl_path, lut, num_classes):
    from dataset.incremental import label_presence

    try:
        return label_presence(str(lbl_path), lut, num_classes)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


@FUZZ
@given(data=st.data(), values=st.lists(st.integers(0, 255), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["L", "P", "I;16"]), corrupt=st.booleans(), cityscapes=st.booleans())
def test_label_presence_agrees_with_load_pair(tmp_path, data, values, seed, mode, corrupt, cityscapes):
    """The class-presence pass (index caches) reads labels with the same rules as training: only UserError, and
    when a pair loads, the presence vector is exactly the set of train ids in the loaded label."""
    rng = np.random.default_rng(seed)
    img, lbl = tmp_path / "i.png", tmp_path / "l.png"
    img.write_bytes(_encode(np.full((6, 7, 3), 90, np.uint8), "PNG"))
    blob = bytearray(_encode(rng.choice(values, (6, 7)).astype(np.uint8), "PNG", mode))
    if corrupt:
        for _ in range(data.draw(st.integers(1, 6))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    lbl.write_bytes(bytes(blob))
    lut, n = (CityscapesReader.LABEL_LUT, 20) if cityscapes else (None, 21)
    present = _presence(lbl, lut, n)
    arr = _check(img, lbl, lut, n)
    if arr is not None:
        assert present is not None
        assert np.flatnonzero(present).tolist() == np.unique(arr).tolist()
