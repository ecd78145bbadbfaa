"""What every reader shares: the sample listing checks, label decoding with validation, palettes."""
from __future__ import annotations

import colorsys
import os
from typing import ClassVar

import numpy as np
from PIL import Image

from utils.constants import IGNORE_INDEX
from utils.errors import UserError

SPLITS = ("train", "val")


def bit_palette(n: int = 256) -> np.ndarray:
    """The standard Pascal VOC colour map: class id bits spread over the high bits of R, G, B. (n, 3) uint8."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def spread_palette(n: int, seed: int) -> np.ndarray:
    """``n`` distinct colours: golden-ratio hue steps with alternating saturation/value; entry 0 is black."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(1, n):
        h = (seed * 0.1 + i * 0.618033988749895) % 1.0
        s = (0.95, 0.65, 0.8)[i % 3]
        v = (0.95, 0.75, 0.55)[(i // 3) % 3]
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


class Reader:
    """A split of a dataset on disk: ``samples`` = list of ``(image_path, label_path)``; no incremental logic.

    Subclasses set the class attributes and implement ``_list() -> list[(img, lbl)]`` (raising ``UserError`` for a
    missing root or split listing). Constructing a reader checks that every listed file exists."""

    NAME: ClassVar[str] = ""
    NUM_CLASSES: ClassVar[int] = 0
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    PALETTE: ClassVar[np.ndarray] = np.zeros((0, 3), np.uint8)
    LABEL_LUT: ClassVar[np.ndarray | None] = None
    RAW_VALID: ClassVar[np.ndarray | None] = None  # bool [256]: label file values that exist (None: checked after the LUT)
    AUX: ClassVar[tuple[str, ...]] = ()  # extra per-image maps the reader can load (``load_aux``), e.g. saliency

    def __init__(self, root: str, split: str):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} for {self.NAME}; valid splits: {', '.join(SPLITS)}")
        self.root = os.fspath(root)
        self.split = split
        samples = self._list()
        if not samples:
            raise UserError(f"{self.NAME} {split} split under {self.root!r} lists no image; "
                            f"{self.hint(self.root)}")
        _check_exist(samples, self.NAME, split)
        self.samples: list[tuple[str, str]] = samples

    def _list(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    @classmethod
    def hint(cls, root: str) -> str:
        return f"create the synthetic dataset with: python -m dataset.synthetic {root} --layout {cls.NAME}"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Decoded ``(RGB image, 'L' label in train ids)`` of sample ``index`` (``UserError`` if bad)."""
        img, lbl = self.samples[index]
        return load_pair(img, lbl, self.LABEL_LUT, self.NUM_CLASSES, self.RAW_VALID)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index`` alone: its label file is not opened (weak steps)."""
        path = self.samples[index][0]
        try:
            return _decode(path, "image").convert("RGB")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot convert image {path!r} to RGB ({type(exc).__name__}: {exc}); replace the "
                            "file") from None

    def aux_path(self, name: str, index: int) -> str:
        """Where the ``name`` map of sample ``index`` lives (readers listing ``name`` in ``AUX``)."""
        raise UserError(f"{self.NAME} has no {name} maps")

    def missing_aux(self, name: str, indices) -> list[str]:
        """The ``name`` map files of ``indices`` that do not exist."""
        return [p for p in (self.aux_path(name, int(i)) for i in indices) if not os.path.isfile(p)]

    def load_aux(self, name: str, index: int, size: tuple[int, int] | None = None) -> Image.Image:
        """The ``name`` map of sample ``index`` as a single-channel image; ``size`` (the image's ``(W, H)``): a map
        of another size, or one whose EXIF orientation would show it rotated or mirrored, is refused (a transposed
        map of a portrait image would otherwise be cropped and flipped against the wrong pixels)."""
        path = self.aux_path(name, index)
        if not os.path.isfile(path):
            raise UserError(self.aux_missing_message(name, path))
        aux = _decode(path, name + " map")
        orientation = _exif_orientation(aux)
        if orientation not in (None, 1):
            raise UserError(f"{name} map {path!r} carries EXIF orientation {orientation} (shown rotated or mirrored); "
                            "write it without the orientation tag, its rows as the image's rows")
        if size is not None and aux.size != tuple(size):
            what = "transposed" if aux.size == tuple(size)[::-1] else "of another size"
            raise UserError(f"{name} map {path!r} is {aux.size[0]}x{aux.size[1]} but its image "
                            f"{self.samples[index][0]!r} is {size[0]}x{size[1]} ({what}); regenerate the map "
                            "from this image")
        return aux if aux.mode == "L" else aux.convert("L")

    def aux_missing_message(self, name: str, path: str) -> str:
        return f"{name} map {path} does not exist"

    @classmethod
    def label_map_lines(cls) -> list[str]:
        """What the reader makes of each label-file value, for ``python -m dataset.inspect``."""
        if cls.LABEL_LUT is None:
            return [f"label values are the train ids 0..{cls.NUM_CLASSES - 1}; 255 = ignored"] + [
                f"  {i:3d} {name}" for i, name in enumerate(cls.CLASS_NAMES)]
        lut = np.asarray(cls.LABEL_LUT)
        return ["label value -> train id (name)"] + [
            f"  {raw:3d} -> {int(lut[raw]):3d} ({cls.CLASS_NAMES[int(lut[raw])] if lut[raw] != 255 else 'ignored'})"
            for raw in range(256) if lut[raw] != 255 or raw == 255]

    @classmethod
    def colorize(cls, label: np.ndarray) -> np.ndarray:
        """(H, W) train ids (255 = ignore) -> (H, W, 3) uint8 colours; every value 0..255 has a colour."""
        return full_palette(cls.PALETTE)[np.asarray(label, dtype=np.uint8)]


def full_palette(palette: np.ndarray) -> np.ndarray:
    """A (256, 3) palette: the dataset's colours, then the VOC bit pattern (255 -> (224, 224, 192))."""
    out = bit_palette(256)
    out[: len(palette)] = palette
    out[IGNORE_INDEX] = (224, 224, 192)
    return out


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: PIL raises many types; no tag to honour then
        return None


def _check_exist(samples: list[tuple[str, str]], name: str, split: str) -> None:
    missing = [p for pair in samples for p in pair if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{name} {split} split: {len(missing)} listed file(s) do not exist, first {missing[0]!r}; "
                        f"restore the files or regenerate the dataset/listing")


def _decode(path: str, what: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
            return image
    except FileNotFoundError:
        raise UserError(f"{what} file {path!r} does not exist; restore it or regenerate the dataset") from None
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise UserError(f"cannot decode {what} {path!r} ({type(exc).__name__}: {exc}); "
                        f"replace or remove the file") from None


def _label_array(label: Image.Image, path: str) -> np.ndarray:
    if label.mode in ("L", "P"):
        return np.asarray(label, dtype=np.uint8)
    if label.mode == "1":
        return np.asarray(label, dtype=np.uint8)
    if label.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(label)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"label {path!r} has values outside 0..255 (mode {label.mode}); "
                            f"save labels as 8-bit single-channel PNGs")
        return arr.astype(np.uint8)
    raise UserError(f"label {path!r} has mode {label.mode!r}, expected a single-channel PNG (mode L or P); "
                    f"save class ids, not colours")


def check_raw_values(present: np.ndarray, raw_valid: np.ndarray | None, path: str) -> None:
    """``UserError`` naming the file and the values when a label file holds a value its dataset's map does not have
    (``present``: bool [256], the values in the file)."""
    if raw_valid is None:
        return
    bad = np.asarray(present, dtype=bool) & ~np.asarray(raw_valid, dtype=bool)
    if bad.any():
        values = np.flatnonzero(bad)[:8].tolist()
        raise UserError(f"label {path!r} contains id(s) {values} outside the dataset's label map "
                        f"(valid: {_ranges(np.flatnonzero(raw_valid))}); fix the label file (another dataset's "
                        "labels, or labels converted twice?)")


def _ranges(values) -> str:
    """``[0, 1, 2, 5, 255]`` -> ``"0-2, 5, 255"``."""
    values, out, start = [int(v) for v in values], [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ", ".join(out)


def load_pair(img_path: str, lbl_path: str, lut: np.ndarray | None, num_classes: int,
              raw_valid: np.ndarray | None = None) -> tuple[Image.Image, Image.Image]:
    """Decode and validate one sample: ``(RGB image, 'L' label of train ids)``.

    ``lut`` (uint8 [256], raw id -> train id) is applied when given, after checking the file's values against
    ``raw_valid`` (bool [256]) when given. Raises ``UserError`` (naming the file) when a
    file cannot be decoded, when the label size differs from the image size, or when a label value (after the
    LUT) is neither a class id in ``[0, num_classes)`` nor 255."""
    image = _decode(img_path, "image")
    try:
        image = image.convert("RGB")
    except Exception as exc:
        raise UserError(f"cannot convert image {img_path!r} to RGB ({type(exc).__name__}: {exc}); "
                        f"replace the file") from None
    label = _decode(lbl_path, "label")
    if label.size != image.size:
        raise UserError(f"label {lbl_path!r} is {label.size[0]}x{label.size[1]} but its image {img_path!r} is "
                        f"{image.size[0]}x{image.size[1]}; the pair must have the same size")
    arr = _label_array(label, lbl_path)
    if raw_valid is not None:
        check_raw_values(np.bincount(arr.ravel(), minlength=256) > 0, raw_valid, lbl_path)
    if lut is not None:
        arr = np.asarray(lut, dtype=np.uint8)[arr]
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        values = np.unique(arr[bad])[:8].tolist()
        raise UserError(f"label {lbl_path!r} contains value(s) {values} outside 0..{num_classes - 1} and 255; "
                        f"fix the label file (wrong dataset or colour-coded labels?)")
    return image, Image.fromarray(np.ascontiguousarray(arr))
