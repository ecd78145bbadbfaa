"""The class-incremental view of a reader: image filtering per step and label remapping by lookup table.

Semantics (reference behaviour 4.1): ``labels`` = classes of the current step, ``labels_old`` = classes of the
previous steps (0 is stripped from both). ``order = [0] + labels_old + labels``; an original id ``c`` becomes
``order.index(c)``; 255 stays 255.

* filtering: overlap keeps an image iff it shows >= 1 current foreground class; disjoint additionally drops images
  showing a future class (anything outside ``labels + labels_old + {0, 255}``);
* masking (``data_masking``): ``current`` keeps background + current classes (old and future -> 0), ``current+old``
  keeps old classes too, ``new`` keeps background + current classes and sends everything else to 255;
* the test set is built with the cumulative ``labels`` and no ``labels_old``: unseen classes -> 0.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.base import Reader, _decode, _label_array, check_raw_values
from dataset.cityscapes_domain import DomainIncremental, city_indices
from dataset.readers import READERS
from dataset.tasks import (CROSS_DATASETS, canonical_task, data_sources, extra_test_sources, first_test_source,
                           get_task_labels, train_source)
from dataset.transform import TRAIN_PRESETS, ToTensor, eval_preset
from dataset.weak_shot import weak_shot_split
from utils.constants import BACKGROUND, IGNORE_INDEX
from utils.errors import UserError
from utils.io import atomic_save_numpy, atomic_write_text

log = logging.getLogger(__name__)
MASKINGS = ("current", "current+old", "new")
_PRESENCE_MEMO: dict[str, np.ndarray] = {}


# ----------------------------------------------------------------------------------------------- pure functions
def strip_zero(labels: Sequence[int]) -> list[int]:
    return [int(c) for c in labels if c != BACKGROUND]


def remap_order(labels: Sequence[int], labels_old: Sequence[int]) -> list[int]:
    """``[0] + labels_old + labels`` (0 stripped): the original class id at each remapped index."""
    return [BACKGROUND] + strip_zero(labels_old) + strip_zero(labels)


def inverted_order_lut(labels: Sequence[int], labels_old: Sequence[int]) -> np.ndarray:
    """int64 [256]: original id -> remapped index for ids in the order, 255 -> 255, others -1."""
    lut = np.full(256, -1, dtype=np.int64)
    for index, cls in enumerate(remap_order(labels, labels_old)):
        lut[cls] = index
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def masking_lut(labels: Sequence[int], labels_old: Sequence[int], masking: str = "current") -> torch.Tensor:
    """uint8 tensor [256] mapping a train-id label to the target seen by the model (see module docstring); uint8
    so that label batches stay 8x smaller than int64 until ``labels_to_device``."""
    if masking == "all":
        raise UserError("--data_masking all is not implemented (as in the reference); use current, current+old "
                        "or new")
    if masking not in MASKINGS:
        raise UserError(f"unknown data masking {masking!r}; valid: {', '.join(MASKINGS)}")
    inverted = inverted_order_lut(labels, labels_old)
    keep = [BACKGROUND] + strip_zero(labels)
    if masking == "current+old":
        keep += strip_zero(labels_old)
    fill = IGNORE_INDEX if masking == "new" else BACKGROUND
    lut = np.full(256, fill, dtype=np.uint8)
    lut[keep] = inverted[keep]
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return torch.from_numpy(lut)


def filter_images(presence: np.ndarray, labels: Sequence[int], labels_old: Sequence[int], overlap: bool
                  ) -> np.ndarray:
    """Indices (int64, ascending) of the images kept for a step; ``presence`` is bool ``(N, 256)``.

    Pure: the arguments are not modified."""
    presence = np.asarray(presence, dtype=bool)
    current = strip_zero(labels)
    keep = presence[:, current].any(axis=1) if current else np.zeros(len(presence), dtype=bool)
    if not overlap:
        allowed = np.zeros(256, dtype=bool)
        allowed[current + strip_zero(labels_old) + [BACKGROUND, IGNORE_INDEX]] = True
        keep &= ~presence[:, ~allowed].any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def test_on_val_split(idxs: np.ndarray, train: bool) -> np.ndarray:
    """Reference ``test_on_val``: shuffle with ``RandomState(1)``; train side = first 80 %, other side = the rest."""
    idxs = np.array(idxs, dtype=np.int64, copy=True)
    np.random.RandomState(1).shuffle(idxs)
    cut = int(0.8 * len(idxs))
    return idxs[:cut] if train else idxs[cut:]


# ----------------------------------------------------------------------------------------------- class presence
def listing_key(reader: Reader) -> str:
    """Hash of the split listing (paths relative to the reader root), each label file's size and modification
    time (labels rewritten under the same names invalidate the caches), the label LUT and the class count."""
    digest = hashlib.sha1()
    for img, lbl in reader.samples:
        stat = os.stat(lbl)
        digest.update(os.path.relpath(img, reader.root).encode() + b"\0")
        digest.update(os.path.relpath(lbl, reader.root).encode() + f"\0{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if reader.LABEL_LUT is not None:
        digest.update(np.asarray(reader.LABEL_LUT, dtype=np.uint8).tobytes())
    digest.update(str(reader.NUM_CLASSES).encode())
    return digest.hexdigest()[:16]


def label_presence(lbl_path: str, lut: np.ndarray | None, num_classes: int,
                   raw_valid: np.ndarray | None = None) -> np.ndarray:
    """bool [256]: which train ids occur in a label file (validated like ``load_pair``)."""
    arr = _label_array(_decode(lbl_path, "label"), lbl_path)
    counts = np.bincount(arr.ravel(), minlength=256)
    present = counts > 0
    check_raw_values(present, raw_valid, lbl_path)
    if lut is not None:
        mapped = np.zeros(256, dtype=bool)
        mapped[np.asarray(lut, dtype=np.uint8)[present]] = True
        present = mapped
    bad = present.copy()
    bad[:num_classes] = False
    bad[IGNORE_INDEX] = False
    if bad.any():
        raise UserError(f"label {lbl_path!r} contains value(s) {np.flatnonzero(bad)[:8].tolist()} outside "
                        f"0..{num_classes - 1} and 255; fix the label file")
    return present


PARALLEL_FROM = 2000  # label files: below, one thread (a thread pool costs more than it saves)


def scan_presence(reader: Reader, threads: int | None = None) -> np.ndarray:
    """bool ``(len(reader), 256)`` from one pass over the label files. Large splits (COCO's 118,287 labels) are
    decoded by a thread pool (PNG decoding releases the GIL) and say how far they are (k/n in the log); ``threads``
    overrides the choice (1: one thread)."""
    def one(sample):
        return label_presence(sample[1], reader.LABEL_LUT, reader.NUM_CLASSES, reader.RAW_VALID)

    n = len(reader.samples)
    threads = threads or (min(16, os.cpu_count() or 1) if n >= PARALLEL_FROM else 1)
    if threads == 1:
        return np.stack([one(s) for s in reader.samples])
    out = np.zeros((n, 256), dtype=bool)
    step = max(1, n // 10)
    log.info("indexing the classes of %d %s %s labels once (%d threads; cached afterwards)", n, reader.NAME,
             reader.split, threads)
    with ThreadPoolExecutor(threads) as pool:
        for i, present in enumerate(pool.map(one, reader.samples, chunksize=64)):
            out[i] = present
            if (i + 1) % step == 0 or i + 1 == n:
                log.info("class index of %s %s: %d/%d labels", reader.NAME, reader.split, i + 1, n)
    return out


def class_presence(reader: Reader, cache_dir: str | None = None) -> np.ndarray:
    """bool ``(len(reader), 256)``: classes (train ids) present in each label of the split.

    Computed once per split listing (one pass over the label PNGs), memoised in the process and, with
    ``cache_dir``, stored atomically at ``{cache_dir}/classes-{split}-{listing hash}.npy``."""
    key = listing_key(reader)
    path = os.path.join(cache_dir, f"classes-{reader.split}-{key}.npy") if cache_dir else None
    memo_key = f"{os.path.abspath(reader.root)}|{reader.split}|{key}"
    if memo_key in _PRESENCE_MEMO:
        return _PRESENCE_MEMO[memo_key]
    presence = None
    if path and os.path.isfile(path):
        try:
            loaded = np.load(path, allow_pickle=False)
            if loaded.shape == (len(reader), 256) and loaded.dtype == bool:
                presence = loaded
        except (OSError, ValueError):
            presence = None  # unreadable cache: recompute and overwrite
    if presence is None:
        presence = scan_presence(reader)
        if path:
            atomic_save_numpy(path, presence)
    presence.setflags(write=False)
    _PRESENCE_MEMO[memo_key] = presence
    return presence


# ----------------------------------------------------------------------------------------------- index cache
def _load_cached_idxs(path: str, n: int, key: str) -> np.ndarray | None:
    """Cached indices if present and written for this listing (its sidecar ``.key`` file says so), else None: a
    cache without its key (an older version's, or one whose key was lost) is recomputed, never trusted."""
    sidecar = path + ".key"
    if not os.path.isfile(path) or not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("listing") != key:
        return None  # written for another listing: recompute
    try:
        idxs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"index cache {path!r} is unreadable ({exc}); delete it to rebuild") from None
    if idxs.ndim != 1 or not np.issubdtype(idxs.dtype, np.integer) or (idxs.size and (idxs.min() < 0
                                                                                       or idxs.max() >= n)):
        raise UserError(f"index cache {path!r} does not match the {n}-image split; delete it to rebuild")
    return idxs.astype(np.int64)


def cached_indices(path: str, reader: Reader, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The index cache at ``path`` when it was written for this listing (``key``), else ``compute()`` stored there
    atomically with its key."""
    idxs = _load_cached_idxs(path, len(reader), key)
    if idxs is None:
        idxs = compute()
        atomic_save_numpy(path, idxs)
        atomic_write_text(path + ".key", json.dumps({"listing": key}))
    return idxs


# ----------------------------------------------------------------------------------------------- the dataset
class IncrementalSegmentation(Dataset):
    """Images of ``reader`` kept for one step, with remapped/masked labels.

    Items: ``(image uint8 (3, H, W), label uint8 (H, W))``, or ``(image, label, {name: uint8 (H, W)})`` with
    ``aux`` maps (e.g. saliency) transformed jointly with the label.

    ``train`` only selects the side of the ``test_on_val`` 80/20 split (first 80 % when True). ``idxs_path``:
    index cache (read back if present, else written atomically). ``presence_dir``: where the per-split class
    presence cache lives (None = memory only). ``description`` names the dataset/task/step/split in errors.
    ``idxs``: explicit reader indices instead of the class filter (an exemplar memory)."""

    def __init__(self, reader: Reader, *, labels: Sequence[int], labels_old: Sequence[int] = (),
                 overlap: bool = True, masking: str = "current", train: bool = True,
                 transform: Callable | None = None, idxs_path: str | None = None, presence_dir: str | None = None,
                 test_on_val: bool = False, description: str = "", idxs=None, aux: Sequence[str] = (),
                 ignored: Sequence[int] = ()):
        labels, labels_old = strip_zero(labels), strip_zero(labels_old)
        if set(labels) & set(labels_old):
            raise UserError(f"classes {sorted(set(labels) & set(labels_old))} are both new and old; "
                            f"fix the task table")
        bad = [c for c in labels + labels_old if not 0 < c < reader.NUM_CLASSES]
        if bad:
            raise UserError(f"classes {bad} do not exist in {reader.NAME} (0..{reader.NUM_CLASSES - 1})")
        self.reader = reader
        self.labels, self.labels_old = labels, labels_old
        self.order = remap_order(labels, labels_old)
        self.lut = masking_lut(labels, labels_old, masking)
        self.lut[list(ignored)] = IGNORE_INDEX  # a weak-shot task's unlabelled class (ADE's "other")
        self.masking = masking
        self.transform = transform
        self.description = description or f"{reader.NAME} {reader.split} split"
        self.aux = tuple(aux)
        self.idxs = (np.asarray(idxs, dtype=np.int64) if idxs is not None
                     else self._indices(overlap, train, idxs_path, presence_dir, test_on_val))
        if len(self.idxs) == 0:
            raise UserError(f"no image left for {self.description} after filtering (classes {labels}); "
                            f"use a larger dataset or another task/step")

    def _indices(self, overlap, train, idxs_path, presence_dir, test_on_val) -> np.ndarray:
        def compute():
            return filter_images(class_presence(self.reader, presence_dir), self.labels, self.labels_old, overlap)

        idxs = cached_indices(idxs_path, self.reader, listing_key(self.reader), compute) if idxs_path else compute()
        if test_on_val:
            idxs = test_on_val_split(idxs, train)
        return idxs

    def __len__(self) -> int:
        return len(self.idxs)

    def __getitem__(self, index: int):
        i = int(self.idxs[index])
        image, label = self.reader.load(i)
        if self.aux:
            label = (label, *(self.reader.load_aux(name, i, image.size) for name in self.aux))
        image, label = (self.transform or ToTensor())(image, label)
        maps = label[1:] if self.aux else ()
        label = label[0] if self.aux else label
        if not torch.is_tensor(label):
            label = torch.from_numpy(np.asarray(label, dtype=np.uint8))
        label = torch.take(self.lut, label.long())  # LUT remap (take: much faster than indexing); uint8
        if self.aux:
            return image, label, dict(zip(self.aux, maps))
        return image, label

    def with_aux(self, names: Sequence[str]) -> "IncrementalSegmentation":
        """The same images with extra maps per item; every map file must exist (one-line error naming the first
        missing one)."""
        for name in names:
            if name not in self.reader.AUX:
                raise UserError(f"{self.reader.NAME} has no {name} maps")
            missing = self.reader.missing_aux(name, self.idxs)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(self.reader.aux_missing_message(name, missing[0]) + more)
        out = copy.copy(self)
        out.aux = tuple(names)
        return out

    def sample_path(self, index: int) -> tuple[str, str]:
        return self.reader.samples[int(self.idxs[index])]


def with_label_dir(reader: Reader, folder: str) -> Reader:
    """A copy of ``reader`` whose labels are ``{folder}/{image name}.png`` in train ids (no label map applied), e.g.
    the pseudo-masks of ``wsss.py make_masks``; every one must exist."""
    if not os.path.isdir(folder):
        raise UserError(f"--train_labels {folder}: no such folder (the label PNGs of the training images, e.g. "
                        "wsss.py make_masks' masks/)")
    out = copy.copy(reader)
    out.samples = [(img, os.path.join(folder, os.path.splitext(os.path.basename(img))[0] + ".png"))
                   for img, _ in reader.samples]
    missing = [lbl for _, lbl in out.samples if not os.path.isfile(lbl)]
    if missing:
        raise UserError(f"--train_labels {folder}: {len(missing)} of the {len(out.samples)} training images have no "
                        f"label there (first: {missing[0]}); make them all (wsss.py make_masks) or point elsewhere")
    out.LABEL_LUT, out.RAW_VALID = None, None  # written in train ids
    return out


def weak_old_labels(cfg) -> bool:
    """Whether a weak step's image labels name the old classes too: ``--weak_old_labels``, or WILSON's ``--no_mask``
    with ``--weakly`` (its meaning there)."""
    return bool(getattr(cfg, "weakly", False) and (getattr(cfg, "weak_old_labels", False)
                                                   or getattr(cfg, "no_mask", False)))


class WeakSegmentation(IncrementalSegmentation):
    """The training images of a weak step (WILSON's protocol): no label file is opened. Items: ``(image, label,
    {"img_labels": float32 (C - 1,)})`` where the label is 255 everywhere (transformed with the image so that crops
    keep their shape) and ``img_labels[k - 1]`` is 1 when remapped class ``k`` is a class of this step present in the
    image's full ground truth (the class index of the split, or ``img_labels_file``), 0 for old classes (present old
    classes too with ``old_labels``: WILSON's Table 5 variant).

    ``img_labels_file``: a ``.npy`` array (images of the split x classes 1..N-1 in the reader's ids; WILSON's
    ``voc_1h_labels_train.npy``). A step in which a new class is in every training image has no negative image for an
    image-level loss: refused unless ``allow_single``."""

    def __init__(self, reader: Reader, *, presence_dir: str | None = None, img_labels_file: str | None = None,
                 allow_single: bool = False, step: int = 0, old_labels: bool = False, from_crop: bool = False,
                 **kwargs):
        super().__init__(reader, presence_dir=presence_dir, **kwargs)
        if self.aux:
            raise UserError("a weak step's training images carry no per-pixel maps (saliency): drop --weakly or the "
                            "option that needs them")
        present = (_image_labels_file(img_labels_file, reader) if img_labels_file
                   else class_presence(reader, presence_dir))[self.idxs]
        self.img_labels = np.zeros((len(self.idxs), len(self.order) - 1), dtype=np.float32)
        self.columns = [(self.order.index(c) - 1, c) for c in list(self.labels) + (list(self.labels_old) if old_labels
                                                                                     else []) if c != 0]
        for column, c in self.columns:
            self.img_labels[:, column] = present[:, c]
        self.from_crop = from_crop
        everywhere = [c for c in self.labels if present[:, c].all()]
        if everywhere and not allow_single:
            name = reader.CLASS_NAMES[everywhere[0]] if everywhere[0] < len(reader.CLASS_NAMES) else everywhere[0]
            raise UserError(f"weak step {step}: every one of its {len(self.idxs)} training images holds class "
                            f"{everywhere[0]} ({name}), so an image-level loss has no negative image of it (a "
                            "single-class step: WILSON collapses there, RaSP's runs on VOC 15-1 end at 0.35 / 0.57 "
                            "mIoU disjoint / overlap); choose a task with several classes per step or pass "
                            "--weak_allow_single to run it anyway")

    def __getitem__(self, index: int):
        if self.from_crop:
            return self._crop_item(index)
        image = self.reader.load_image(int(self.idxs[index]))
        image, _ = (self.transform or ToTensor())(image, Image.new("L", image.size, IGNORE_INDEX))
        # a fresh map: a padding crop fills the transformed blank with background
        return image, torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.uint8), {
            "img_labels": torch.from_numpy(self.img_labels[index])}

    def _crop_item(self, index: int):
        """SimFormer's rule (``--img_labels_from crop``): the label file is read and transformed with the image only to
        list the classes still present in the crop; the item's label stays all 255."""
        image, label = self.reader.load(int(self.idxs[index]))
        image, label = (self.transform or ToTensor())(image, label)
        label = label if torch.is_tensor(label) else torch.from_numpy(np.asarray(label, dtype=np.uint8))
        present = torch.bincount(label.flatten().long(), minlength=256) > 0
        vector = np.zeros_like(self.img_labels[index])
        for column, c in self.columns:
            vector[column] = float(present[c])
        return image, torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.uint8), {
            "img_labels": torch.from_numpy(vector)}

    def with_aux(self, names: Sequence[str]) -> "IncrementalSegmentation":
        raise UserError(f"a weak step's training images carry no per-pixel maps ({', '.join(names)}): drop --weakly "
                        "or the option that needs them")


class WeakShotSegmentation(IncrementalSegmentation):
    """The training images of a weak-shot task (SimFormer's mapper; ``dataset/weak_shot.py``): every class is
    trained at once, the ``novel`` ones from image labels only. Items: ``(image, label, {"novel_labels": float32
    (C,)})`` where the label's novel pixels are 255 and ``novel_labels[k]`` is 1 when novel class ``k`` (model index)
    is present in the augmented crop (SimFormer reads the classes of the transformed ground truth, so a class cropped
    away is not claimed)."""

    def __init__(self, reader: Reader, *, novel: Sequence[int], **kwargs):
        super().__init__(reader, **kwargs)
        index = {c: i for i, c in enumerate(self.order)}
        self.novel = torch.tensor([index[c] for c in novel], dtype=torch.long)
        self.n_classes = len(self.order)
        self.hidden = torch.zeros(256, dtype=torch.bool)  # by label value: the novel classes' pixels become 255
        self.hidden[self.novel] = True

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        image, label = item[0], item[1]
        maps = dict(item[2]) if len(item) == 3 else {}
        present = torch.bincount(label.flatten().long(), minlength=256)[self.novel] > 0
        vector = torch.zeros(self.n_classes, dtype=torch.float32)
        vector[self.novel] = present.float()
        label = torch.where(self.hidden[label.long()], torch.full_like(label, IGNORE_INDEX), label)
        return image, label, {**maps, "novel_labels": vector}


def _image_labels_file(path: str, reader: Reader) -> np.ndarray:
    """bool ``(len(reader), 256)`` from an image-label array ``(len(reader), NUM_CLASSES - 1)``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--img_labels {path}: cannot be read as a .npy array ({exc})") from None
    expected = (len(reader), reader.NUM_CLASSES - 1)
    if array.shape != expected:
        raise UserError(f"--img_labels {path}: shape {array.shape}, expected {expected} (one row per image of the "
                        f"{reader.NAME} {reader.split} listing, one column per class 1..{reader.NUM_CLASSES - 1})")
    out = np.zeros((len(reader), 256), dtype=bool)
    out[:, 1:reader.NUM_CLASSES] = np.asarray(array, dtype=np.float64) > 0.5
    return out


# ----------------------------------------------------------------------------------------------- builder
def _cross_val_split(train: IncrementalSegmentation, seed: int, description: str) -> IncrementalSegmentation:
    """Reference ``--cross_val``: ``random_split(train, [int(0.8 n), n - int(0.8 n)])``; ``train`` keeps the first
    part (modified in place), the returned view (same reader, transform and masking) holds the rest."""
    perm = torch.randperm(len(train.idxs), generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(0.8 * len(perm))
    val = copy.copy(train)
    train.idxs, val.idxs = train.idxs[perm[:cut]], train.idxs[perm[cut:]]
    val.description = description
    if len(val.idxs) == 0 or len(train.idxs) == 0:
        raise UserError(f"--cross_val: {len(perm)} training image(s) for {train.description} cannot be split "
                        f"80/20; use a larger dataset or drop --cross_val")
    return val


def step_cache_dir(cache_root: str, dataset: str, task: str, overlap: bool) -> str:
    """``{cache_root}/{dataset}/{task}[-ov]`` (the reference's index-cache folder)."""
    return os.path.join(cache_root, dataset, canonical_task(dataset, task) + ("-ov" if overlap else ""))


def source_roots(dataset: str, root: str, data_roots=()) -> dict[str, str]:
    """The folder of each source of ``dataset``: ``--data_roots SOURCE=PATH`` where given, else ``--data_root`` (the
    readers find their sub-folder in it: coco/, voc/, PascalVOC12/)."""
    sources = data_sources(dataset)
    given = dict(data_roots or ())
    unknown = sorted(set(given) - set(sources))
    if unknown:
        raise UserError(f"--data_roots names {unknown[0]!r}, which --dataset {dataset} does not read; its sources: "
                        f"{', '.join(sources)}")
    return {name: given.get(name, root) for name in sources}


def build_datasets(*, dataset: str, root: str, task: str, step: int, overlap: bool, data_masking: str = "current",
                   crop_size: int, crop_val: bool = True, cache_root: str = "data", test_on_val: bool = False,
                   val_on_trainset: bool = False, cross_val: bool = False, seed: int = 42, augment: str = "reference",
                   test_unseen: str = "background", data_roots=(), crop_size_val: int | None = None,
                   weak: bool = False, img_labels_file: str | None = None, weak_allow_single: bool = False,
                   weak_old_labels: bool = False, train_labels: str | None = None, img_labels_from: str = "image",
                   novel_has_mask: bool = False):
    """``(train, val, test)`` for one step, as the reference ``get_dataset``.

    train: train split, ``overlap`` filtering, masked; val: val split, overlap filtering, masked the same way
    (old classes -> 0); test: val split (train split with ``val_on_trainset``), cumulative labels, unseen -> 0
    (``test_unseen="ignore"``: unseen -> 255, SSUL's metric). ``augment``: a key of ``TRAIN_PRESETS``.
    ``cross_val``: the reference's ``random_split`` of the train dataset, 80 % train / 20 % val, drawn from a
    generator seeded with ``seed`` (= the reference's global RNG right after ``torch.manual_seed(random_seed)``);
    the val part keeps the train transform and masking, as in the reference. A cross-dataset task reads the step's
    training source (``data_roots``: ``{source: folder}``); its other test sets come from :func:`extra_test_sets`.
    ``weak``: the training set is a :class:`WeakSegmentation` (image-level labels only). ``train_labels``: a folder
    of label PNGs (train ids, one per training image, named as the image) the training set reads instead of the
    ground truth (:func:`with_label_dir`). ``novel_has_mask``: a weak-shot task trains its novel classes on pixel
    labels too (SimFormer's retraining on pseudo-masks, or the oracle on the ground truth)."""
    task = canonical_task(dataset, task)
    source = train_source(dataset, step)
    roots = source_roots(dataset, root, data_roots)
    reader_cls = READERS[data_sources(dataset)[source]]
    labels, labels_old = get_task_labels(dataset, task, step)
    folder = step_cache_dir(cache_root, dataset, task, overlap)
    presence_dir = os.path.join(cache_root, reader_cls.NAME)
    mode = "overlap" if overlap else "disjoint"
    train_reader = reader_cls(roots[source], "train")
    if train_labels:
        train_reader = with_label_dir(train_reader, train_labels)
        folder += "-labels-" + hashlib.sha1(os.path.abspath(train_labels).encode()).hexdigest()[:8]
    val_reader = reader_cls(roots[source], "val")
    eval_crop = crop_size_val or crop_size

    def describe(split):
        return f"{dataset} task {task} step {step} {split} split ({mode})"

    if getattr(reader_cls, "DOMAIN_INCREMENTAL", False):
        return _domain_datasets(train_reader, labels=labels, labels_old=labels_old, step=step, folder=folder,
                                crop_size=crop_size, crop_val=crop_val, val_on_trainset=val_on_trainset,
                                cross_val=cross_val, seed=seed, describe=describe, augment=augment)

    weak_args = (dict(img_labels_file=img_labels_file, allow_single=weak_allow_single, step=step,
                      old_labels=weak_old_labels, from_crop=img_labels_from == "crop")
                 if weak and step > 0 else {})
    shot = weak_shot_split(dataset, task)
    ignored = shot.ignored if shot is not None else ()
    if shot is not None and novel_has_mask:
        train_cls, weak_args = IncrementalSegmentation, {"ignored": ignored}
    elif shot is not None:
        train_cls, weak_args = WeakShotSegmentation, {"novel": shot.novel, "ignored": ignored}
    else:
        train_cls = WeakSegmentation if weak_args else IncrementalSegmentation
    train = train_cls(
        train_reader, labels=labels, labels_old=labels_old, overlap=overlap, masking=data_masking, train=True,
        transform=TRAIN_PRESETS[augment](crop_size), idxs_path=os.path.join(folder, f"train-{step}.npy"),
        presence_dir=presence_dir, test_on_val=test_on_val, description=describe("train"), **weak_args)
    if cross_val:
        val = _cross_val_split(train, seed, describe("cross-validation"))
    else:
        val = IncrementalSegmentation(
            val_reader, labels=labels, labels_old=labels_old, overlap=True, masking=data_masking, train=False,
            transform=eval_preset(eval_crop, crop_val), idxs_path=os.path.join(folder, f"val-{step}.npy"),
            presence_dir=presence_dir, description=describe("val"), ignored=ignored)
    test = _test_set(dataset, task, step, first_test_source(dataset), roots, folder, cache_root, eval_crop, crop_val, val_on_trainset,
                     test_on_val, test_unseen, describe)
    return train, val, test


def _test_set(dataset, task, step, source, roots, folder, cache_root, eval_crop, crop_val, val_on_trainset,
              test_on_val, test_unseen, describe) -> IncrementalSegmentation:
    """The cumulative test set of ``step`` on the val split (train split with ``val_on_trainset``) of ``source``; the
    first test source keeps the reference's cache name, the others add ``-{source}``."""
    reader_cls = READERS[data_sources(dataset)[source]]
    labels, labels_old = get_task_labels(dataset, task, step)
    split = "train" if val_on_trainset else "val"
    suffix = "" if source == first_test_source(dataset) else f"-{source}"
    where = f" of {source}" if dataset in CROSS_DATASETS else ""
    return IncrementalSegmentation(
        reader_cls(roots[source], split), labels=labels_old + labels, labels_old=(), overlap=True,
        masking="new" if test_unseen == "ignore" else "current", train=val_on_trainset,
        transform=eval_preset(eval_crop, crop_val), idxs_path=os.path.join(folder, f"test_on_{split}-{step}{suffix}.npy"),
        presence_dir=os.path.join(cache_root, reader_cls.NAME), test_on_val=test_on_val,
        description=describe(f"test ({split}{where})"),
        ignored=shot.ignored if (shot := weak_shot_split(dataset, task)) is not None else ())


def extra_test_sets(cfg, step: int) -> dict[str, IncrementalSegmentation]:
    """The test sets of ``step`` after the first (the one of :func:`build_step_datasets`), ``{source: dataset}``:
    empty unless ``--dataset`` is a cross-dataset task."""
    sources = extra_test_sources(cfg.dataset, step)
    if not sources:
        return {}
    task = canonical_task(cfg.dataset, cfg.task)
    roots = source_roots(cfg.dataset, cfg.data_root, cfg.data_roots)
    folder = step_cache_dir(cfg.cache_root, cfg.dataset, task, cfg.overlap)
    mode = "overlap" if cfg.overlap else "disjoint"

    def describe(split):
        return f"{cfg.dataset} task {task} step {step} {split} split ({mode})"

    return {source: _test_set(cfg.dataset, task, step, source, roots, folder, cfg.cache_root,
                              cfg.crop_size_val or cfg.crop_size, cfg.crop_val, cfg.val_on_trainset, cfg.test_on_val,
                              cfg.test_unseen, describe)
            for source in sources}


def _domain_datasets(reader, *, labels, labels_old, step, folder, crop_size, crop_val, val_on_trainset, cross_val,
                     seed, describe, augment="reference"):
    """PLOP's cityscapes_domain ``get_dataset``: train and validation split the step's cities 80/20, the test set is
    the 20 % of every city seen so far (the 80 % with ``--val_on_trainset``)."""
    eval_transform = eval_preset(crop_size, crop_val)
    key = listing_key(reader)

    def cached(cities, name):  # keyed by the listing, as the class-incremental caches: added images rebuild it
        return cached_indices(os.path.join(folder, name), reader, key, lambda: city_indices(reader, cities))

    train = DomainIncremental(reader, cities=labels, train=True, transform=TRAIN_PRESETS[augment](crop_size),
                              idxs=cached(labels, f"train-{step}.npy"), description=describe("train"))
    if cross_val:
        val = _cross_val_split(train, seed, describe("cross-validation"))
    else:
        val = DomainIncremental(reader, cities=labels, train=False, transform=eval_transform,
                                idxs=cached(labels, f"val-{step}.npy"), description=describe("val"))
    split = "train" if val_on_trainset else "val"
    test = DomainIncremental(reader, cities=labels_old + labels, train=val_on_trainset, transform=eval_transform,
                             idxs=cached(labels_old + labels, f"test_on_{split}-{step}.npy"),
                             description=describe(f"test ({split})"))
    return train, val, test


def build_step_datasets(cfg, step: int):
    """(train, val, test) incremental datasets of ``step`` from a configuration with the run.py flag names."""
    return build_datasets(dataset=cfg.dataset, root=cfg.data_root, task=cfg.task, step=step, overlap=cfg.overlap,
                          data_masking=cfg.data_masking, crop_size=cfg.crop_size, crop_val=cfg.crop_val,
                          cache_root=cfg.cache_root, test_on_val=cfg.test_on_val,
                          val_on_trainset=cfg.val_on_trainset, cross_val=cfg.cross_val, seed=cfg.random_seed,
                          augment=cfg.train_augment, test_unseen=cfg.test_unseen, data_roots=cfg.data_roots,
                          crop_size_val=cfg.crop_size_val, weak=cfg.weakly, img_labels_file=cfg.img_labels,
                          weak_allow_single=cfg.weak_allow_single, weak_old_labels=weak_old_labels(cfg),
                          train_labels=cfg.train_labels, img_labels_from=cfg.img_labels_from,
                          novel_has_mask=cfg.novel_has_mask)
