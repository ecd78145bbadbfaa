"""Synthetic datasets in the real on-disk layouts of VOC, ADE20K, Cityscapes, COCO (COCO-Stuff maps), COCO-to-VOC
(``coco/`` and ``voc/`` side by side, as WILSON's data folder) and COCO-Stuff-10K (for demos and tests).

    python -m dataset.synthetic ROOT --layout voc|ade|cityscapes|coco|coco-voc|coco_stuff_10k [--size 96] [--train N]
                                     [--val M] [--seed 0]
                                     [--cooccur A:B ...] [--cooccur_prob 0.9] [--force]

Every foreground class has its own look: a base hue (neighbouring class ids have neighbouring hues), a
saturation/brightness level, a texture family shared by every 4th class (stripes, checks, dots, rings) with a
class-specific period and orientation, and a shape family. Objects are drawn on a cluttered, low-saturation
background with noise blobs and pixel noise; colours are jittered per image. Each image holds 1 to 4 objects.

Coverage guarantee: the first images of each split are single-object images cycling over all foreground
classes (at least one per class and split), so every step of every task has training and validation images under
both the overlap and the disjoint protocols. The rest are multi-object images with classes dealt from a shuffled
deck (balanced class frequencies).

Co-occurrence (``--cooccur A:B``, class ids in the real label space, repeatable): an image that holds one class of
a pair also holds the other with probability ``--cooccur_prob`` (single-object images included), the partner placed
touching it (rider on motorcycle, sidewalk next to road). Without pairs the output is the same as before the option
existed.

VOC labels get 255 rings (1 px) on object outlines; train labels are saved in mode L, val labels in mode P (VOC
palette), as in the real data. Cityscapes labels hold raw label ids (mapped by the reader's LUT) and include some
regions with ignored ids; images are spread over the real city folders of each split (18 train, 3 val cities), so
the same folder serves the class-incremental (``--dataset cityscapes``) and the domain-incremental
(``--dataset cityscapes_domain``) protocols. The output is deterministic for a seed and written atomically (temporary folder, then
rename).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

from dataset.base import bit_palette
from dataset.ade import ADEReader
from dataset.cityscapes import RAW_TO_TRAIN, CityscapesReader
from dataset.coco import COCOReader, COCOStuff10kReader
from dataset.labelmaps import coco_category_to_train, coco_things, voc_to_coco
from dataset.voc import VOCReader
from utils.errors import UserError

CITYSCAPES_IGNORED_IDS = (1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
TRAIN_TO_RAW = {train: raw for raw, train in RAW_TO_TRAIN.items()}
MARKER = "SYNTHETIC.json"  # at the dataset root: how it was generated; run records and plots say "synthetic"
SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
TEXTURES = ("stripes", "checks", "dots", "rings")


# ----------------------------------------------------------------------------------------------- class looks
def class_look(cls: int, num_fg: int) -> dict:
    """Appearance parameters of foreground class ``cls`` (1-based) among ``num_fg`` classes."""
    n_hue = num_fg if num_fg <= 24 else 25
    k = cls - 1
    hue_idx, group = k % n_hue, k // n_hue
    return dict(
        hue=(hue_idx / n_hue + 0.011 * group) % 1.0,
        sat=(0.85, 0.62, 0.95)[(hue_idx + group) % 2 + (group % 3 == 2)],
        val=(0.95, 0.76, 0.58)[(hue_idx + group) % 3],
        texture=TEXTURES[(k + group) % 4],
        period=4.0 + (k * 3 + group) % 5,
        angle=((k * 37 + group * 11) % 180) * np.pi / 180,
        shape=SHAPES[(k // 2 + group) % 4],
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)


def _shape_mask(shape, yy, xx, cy, cx, ry, rx, rot):
    u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
    v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
    if shape == "ellipse":
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    if shape == "triangle":
        t = (v + ry) / (2 * ry)
        return (t >= 0) & (t <= 1) & (np.abs(u) <= rx * t)
    return np.abs(u) / rx + np.abs(v) / ry <= 1.0  # diamond


def _texture(kind, yy, xx, cy, cx, period, angle):
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)) > 0).astype(np.float32)
    if kind == "dots":
        a, b = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (a * a + b * b < (0.32 * period) ** 2).astype(np.float32)
    r = np.sqrt(u * u + v * v)
    return (0.5 + 0.5 * np.sin(2 * np.pi * r / period)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- one image
def render(rng: np.random.Generator, classes: list[int], num_fg: int, height: int, width: int, single: bool,
           clutter_ids: tuple[int, ...] = (), partners: dict[int, int] | None = None, looks: dict | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uint8 (H, W, 3) image, uint8 (H, W) label, uint8 (H, W) clutter)`` with the given foreground classes
    (later ones on top). ``partners``: class -> an earlier class of the image it is drawn touching.

    ``clutter``: ids from ``clutter_ids`` given to some background blobs not covered by an object (Cityscapes
    ignored ids), 0 elsewhere; kept apart from ``label`` because its ids live in another id space. ``looks``: class
    -> ``(class, num_fg)`` whose look it gets (VOC classes drawn as their COCO counterparts in the COCO-to-VOC data)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(height, width)
    scale = side / 96.0
    # background: low saturation base, gradient, clutter blobs
    bg = _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.7))
    grad = 1.0 + rng.uniform(-0.15, 0.15) * (xx / width - 0.5) + rng.uniform(-0.15, 0.15) * (yy / height - 0.5)
    image = bg[None, None, :] * grad[..., None]
    label = np.zeros((height, width), dtype=np.uint8)
    clutter = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        blob = _shape_mask("ellipse", yy, xx, rng.uniform(0, height), rng.uniform(0, width),
                           rng.uniform(3, 16) * scale, rng.uniform(3, 16) * scale, rng.uniform(0, np.pi))
        image[blob] = _hsv(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.2, 0.85))
        if clutter_ids and rng.random() < 0.3:
            clutter[blob] = clutter_ids[int(rng.integers(len(clutter_ids)))]
    light = rng.uniform(0.85, 1.1)
    placed: dict[int, tuple[float, float, float]] = {}
    for cls in classes:
        look = class_look(*(looks or {}).get(cls, (cls, num_fg)))
        lo, hi = (0.32, 0.6) if single else (0.2, 0.42)
        ry, rx = rng.uniform(lo, hi, size=2) * side / 2 * np.array([1.0, 1.0])
        if look["shape"] in ("rectangle", "diamond", "triangle"):
            ry, rx = ry * 1.1, rx * 1.1
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        anchor = placed.get((partners or {}).get(cls, -1))
        if anchor is not None:  # next to its partner: centres one mean radius apart, the shapes overlapping a bit
            angle, (ay, ax, ar) = rng.uniform(0, 2 * np.pi), anchor
            gap = 0.8 * (ar + (ry + rx) / 2)
            cy = float(np.clip(ay + gap * np.sin(angle), 0.1 * height, 0.9 * height))
            cx = float(np.clip(ax + gap * np.cos(angle), 0.1 * width, 0.9 * width))
        placed[cls] = (cy, cx, (ry + rx) / 2)
        mask = _shape_mask(look["shape"], yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        if not mask.any():
            if not single:
                continue
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= max(2.0, 0.2 * side) ** 2
        colour = _hsv(look["hue"] + rng.uniform(-0.012, 0.012), look["sat"] + rng.uniform(-0.06, 0.06),
                      (look["val"] + rng.uniform(-0.06, 0.06)) * light)
        pattern = _texture(look["texture"], yy, xx, cy, cx, look["period"] * scale * rng.uniform(0.9, 1.1),
                           look["angle"] + rng.uniform(-0.15, 0.15))
        depth = rng.uniform(0.3, 0.45)
        shade = 1.0 + 0.12 * ((xx - cx) / max(rx, 1.0)).clip(-1, 1) * rng.choice([-1.0, 1.0])
        pixels = colour[None, :] * ((1.0 - depth * pattern[mask]) * shade[mask])[:, None]
        image[mask] = pixels
        label[mask] = cls
        clutter[mask] = 0
    image = image + rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    return (image.clip(0, 1) * 255 + 0.5).astype(np.uint8), label, clutter


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilate (``steps`` > 0) or erode (< 0) a boolean mask by |steps| 4-neighbour pixels."""
    out = mask.copy()
    for _ in range(abs(steps)):
        src = out if steps > 0 else ~out
        grown = src.copy()
        grown[1:] |= src[:-1]
        grown[:-1] |= src[1:]
        grown[:, 1:] |= src[:, :-1]
        grown[:, :-1] |= src[:, 1:]
        out = grown if steps > 0 else ~grown
    return out


def saliency_map(rng: np.random.Generator, label: np.ndarray, num_classes: int) -> np.ndarray:
    """What an off-the-shelf salient-object detector would give (uint8, 0 = not salient): the objects, each with
    its own confidence, edges one pixel too wide or too narrow, one object in ten missed, and now and then a false
    blob on the background."""
    out = np.zeros(label.shape, dtype=np.uint8)
    for cls in np.unique(label):
        if not 0 < cls < num_classes or rng.random() < 0.1:
            continue
        mask = _grow(label == cls, int(rng.integers(-1, 2)))
        out[mask] = int(rng.integers(140, 256))
    if rng.random() < 0.3:
        h, w = label.shape
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = max(1, h // 10), max(1, w // 10)
        yy, xx = np.ogrid[:h, :w]
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out[blob & (out == 0)] = int(rng.integers(20, 120))
    return out


def boundary_ring(label: np.ndarray) -> np.ndarray:
    """1-px ring on object outlines: pixels with a 4-neighbour of a larger id that is foreground."""
    ring = np.zeros(label.shape, dtype=bool)
    lab = label.astype(np.int16)
    for axis in (0, 1):
        a = np.take(lab, range(0, lab.shape[axis] - 1), axis=axis)
        b = np.take(lab, range(1, lab.shape[axis]), axis=axis)
        diff = a != b
        lower_a = diff & (a < b)  # mark the lower-id side (background side of an object edge)
        lower_b = diff & (b < a)
        if axis == 0:
            ring[:-1] |= lower_a
            ring[1:] |= lower_b
        else:
            ring[:, :-1] |= lower_a
            ring[:, 1:] |= lower_b
    return ring


# ----------------------------------------------------------------------------------------------- scheduling
def add_partners(rng: np.random.Generator, plan: list[tuple[list[int], bool]], pairs, prob: float
                 ) -> list[tuple[list[int], bool, dict[int, int]]]:
    """Each image of ``plan`` with the missing partner of every pair it half-holds (probability ``prob``), drawn
    right after it; returns ``(classes, single, partners)`` (``partners``: added class -> the class it touches)."""
    out = []
    for classes, single in plan:
        classes, partners = list(classes), {}
        for a, b in pairs:
            for have, missing in ((a, b), (b, a)):
                if have in classes and missing not in classes and rng.random() < prob:
                    classes.insert(classes.index(have) + 1, missing)
                    partners[missing] = have
                    single = False
        out.append((classes, single, partners))
    return out


def schedule(rng: np.random.Generator, n_images: int, num_fg: int) -> list[tuple[list[int], bool]]:
    """Classes of each image: single-object images cycling over every class first, then 2-4 object images."""
    if n_images < num_fg:
        raise UserError(f"{n_images} images cannot cover {num_fg} foreground classes; ask for at least {num_fg} "
                        f"images per split (--train/--val)")
    n_single = max(num_fg, int(round(0.35 * n_images)))
    cycle = rng.permutation(num_fg) + 1
    plan = [([int(cycle[i % num_fg])], True) for i in range(n_single)]
    deck: list[int] = []
    for _ in range(n_images - n_single):
        k = int(rng.integers(2, 5))
        chosen: list[int] = []
        while len(chosen) < k:
            if not deck:
                deck = [int(c) + 1 for c in rng.permutation(num_fg)]
            c = deck.pop()
            if c not in chosen:
                chosen.append(c)
        plan.append((chosen, False))
    return plan


# ----------------------------------------------------------------------------------------------- layouts
class _VOCLayout:
    """PascalVOC12/: JPEGImages, SegmentationClassAug (255 boundary rings), saliency_map (SSUL's layout) and the
    split listings."""
    num_classes, train, val, aspect = VOCReader.NUM_CLASSES, 600, 150, 1.0
    dirs = ("JPEGImages", "SegmentationClassAug", "saliency_map", "splits")
    clutter_ids: tuple = ()
    palette = bit_palette(256)

    @classmethod
    def write(cls, root, split, index, image, label, clutter_map) -> str:
        name = f"syn{'t' if split == 'train' else 'v'}_{index:06d}"
        rng = np.random.default_rng([index, split == "train", 7])
        Image.fromarray(saliency_map(rng, label, cls.num_classes)).save(os.path.join(root, "saliency_map",
                                                                                     name + ".png"))
        label[boundary_ring(label)] = 255
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=92)
        lbl = Image.fromarray(label)
        if split == "val":  # real VOC val labels are palette PNGs; the SBD-aug ones are grey
            lbl = lbl.convert("P")
            lbl.putpalette(cls.palette.ravel().tolist())
        lbl.save(os.path.join(root, "SegmentationClassAug", name + ".png"))
        return f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png"

    @staticmethod
    def finish(root, split, lines) -> None:
        name = "train_aug.txt" if split == "train" else "val.txt"
        with open(os.path.join(root, "splits", name), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


class _ADELayout:
    """ADEChallengeData2016/{images,annotations}/{training,validation}."""
    num_classes, train, val, aspect = ADEReader.NUM_CLASSES, 600, 300, 1.0
    dirs = tuple(os.path.join("ADEChallengeData2016", top, sub)
                 for top in ("images", "annotations") for sub in ("training", "validation"))
    clutter_ids: tuple = ()

    @staticmethod
    def write(root, split, index, image, label, clutter_map) -> None:
        sub, prefix = ("training", "train") if split == "train" else ("validation", "val")
        name = f"ADE_{prefix}_{index + 1:08d}"
        base = os.path.join(root, "ADEChallengeData2016")
        Image.fromarray(image).save(os.path.join(base, "images", sub, name + ".jpg"), quality=92)
        Image.fromarray(label).save(os.path.join(base, "annotations", sub, name + ".png"))

    @staticmethod
    def finish(root, split, lines) -> None:
        pass


class _CityscapesLayout:
    """leftImg8bit/{split}/{city} and gtFine/{split}/{city} with raw label ids (the reader maps them to train ids)."""
    num_classes, train, val, aspect = CityscapesReader.NUM_CLASSES, 400, 100, 2.0  # twice as wide as high
    dirs: tuple = ()
    clutter_ids = CITYSCAPES_IGNORED_IDS
    # the real cities of each split, so the domain-incremental protocol (one city per step in 1-1) runs on it too
    cities = {"train": ("aachen", "bremen", "darmstadt", "erfurt", "hanover", "krefeld", "strasbourg", "tubingen",
                        "weimar", "bochum", "cologne", "dusseldorf", "hamburg", "jena", "monchengladbach", "stuttgart",
                        "ulm", "zurich"),
              "val": ("frankfurt", "lindau", "munster")}

    @classmethod
    def write(cls, root, split, index, image, label, clutter_map) -> None:
        raw = np.zeros_like(label)
        for train_id, raw_id in TRAIN_TO_RAW.items():
            raw[label == train_id] = raw_id
        raw[clutter_map > 0] = clutter_map[clutter_map > 0]
        cities = cls.cities[split]
        city = cities[index % len(cities)]
        stem = f"{city}_{index // len(cities):06d}_000019"
        for top, suffix, array in (("leftImg8bit", "_leftImg8bit.png", image), ("gtFine", "_gtFine_labelIds.png", raw)):
            folder = os.path.join(root, top, split, city)
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(array).save(os.path.join(folder, stem + suffix))

    @staticmethod
    def finish(root, split, lines) -> None:
        pass


class _COCOLayout:
    """coco/images/{train2017,val2017}, coco/annotations/... with COCO-Stuff pixel values (things = category id - 1,
    background drawn as stuff values 91..181, some unlabelled 255), coco/split/{train,val}.txt. Fuzz case: every
    tenth image has a corner patch of one of the 11 category ids COCO never uses, which must read as ignored."""
    num_classes, train, val, aspect = COCOReader.NUM_CLASSES, 480, 160, 1.0
    folder = "coco"
    dirs = tuple(os.path.join("coco", top, sub) for top in ("images", "annotations") for sub in ("train2017", "val2017"))
    dirs += (os.path.join("coco", "split"),)
    clutter_ids = tuple(range(91, 182, 7)) + (255,)
    to_raw = np.array([0] * 256, dtype=np.uint8)
    for _raw, _cat, _train, _name in coco_things():
        if _train != 255:
            to_raw[_train] = _raw
    unused_raw = tuple(raw for raw, _, train, _ in coco_things() if train == 255)

    @classmethod
    def write(cls, root, split, index, image, label, clutter_map) -> str:
        folder = "train2017" if split == "train" else "val2017"
        stem = f"{index + 1 + (0 if split == 'train' else 500000):012d}"
        raw = cls.to_raw[label]
        raw[label == 0] = 91 + (index * 13) % 91  # the image's stuff
        raw[clutter_map > 0] = clutter_map[clutter_map > 0]
        if index % 10 == 0:
            raw[:3, :3] = cls.unused_raw[(index // 10) % len(cls.unused_raw)]
        base = os.path.join(root, cls.folder)
        Image.fromarray(image).save(os.path.join(base, "images", folder, stem + ".jpg"), quality=92)
        Image.fromarray(raw).save(os.path.join(base, "annotations", folder, stem + ".png"))
        return stem

    @classmethod
    def finish(cls, root, split, lines) -> None:
        with open(os.path.join(root, cls.folder, "split", f"{split}.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


class _VOCinCOCOLayout(_VOCLayout):
    """The VOC part of the COCO-to-VOC data (``voc/``, WILSON's folder name): VOC ids on disk, each class drawn as its
    COCO counterpart so that what step 1 learns on VOC is what COCO val shows."""
    dirs = tuple(os.path.join("voc", d) for d in _VOCLayout.dirs)
    looks = {voc: (train, COCOReader.NUM_CLASSES - 1) for voc, train in
             ((v, coco_category_to_train()[c]) for v, c in voc_to_coco().items()) if voc}

    @classmethod
    def write(cls, root, split, index, image, label, clutter_map) -> str:
        return super().write(os.path.join(root, "voc"), split, index, image, label, clutter_map)

    @staticmethod
    def finish(root, split, lines) -> None:
        _VOCLayout.finish(os.path.join(root, "voc"), split, lines)


class _COCOStuff10kLayout:
    """images_detectron2/{train,test}, annotations_detectron2/{train,test}: 171 classes drawn as objects (ids 0..170
    on disk), the rest unlabelled (255); the val split is written as ``test``."""
    num_classes, train, val, aspect = COCOStuff10kReader.NUM_CLASSES + 1, 360, 180, 1.0
    dirs = tuple(os.path.join(top, sub) for top in ("images_detectron2", "annotations_detectron2")
                 for sub in ("train", "test"))
    clutter_ids: tuple = ()

    @staticmethod
    def write(root, split, index, image, label, clutter_map) -> None:
        sub = "train" if split == "train" else "test"
        stem = f"COCO_{sub}2014_{index:012d}"
        ids = np.where(label == 0, 255, label.astype(np.int16) - 1).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images_detectron2", sub, stem + ".jpg"), quality=92)
        Image.fromarray(ids).save(os.path.join(root, "annotations_detectron2", sub, stem + ".png"))

    @staticmethod
    def finish(root, split, lines) -> None:
        pass


# Each layout: real class count, default image counts, width/height, and how its files are written; a layout of
# several datasets (COCO-to-VOC) lists its parts.
LAYOUTS = {"voc": _VOCLayout, "ade": _ADELayout, "cityscapes": _CityscapesLayout,
           "coco": (_COCOLayout, _VOCinCOCOLayout), "coco-voc": (_COCOLayout, _VOCinCOCOLayout),
           "coco_stuff_10k": _COCOStuff10kLayout}  # coco writes the VOC part too: --dataset coco and coco-voc read it


def _parts(layout: str) -> tuple:
    spec = LAYOUTS[layout]
    return spec if isinstance(spec, tuple) else (spec,)


def _write_split(tmp: str, writer, split: str, n_images: int, size: int, seed: int, pairs=(),
                 prob: float = 0.0) -> None:
    num_fg = writer.num_classes - 1
    height, width = size, int(round(size * writer.aspect))
    split_id = 0 if split == "train" else 1
    plan = schedule(np.random.default_rng([seed, split_id, 1 << 20]), n_images, num_fg)
    plan = add_partners(np.random.default_rng([seed, split_id, 1 << 21]), plan, pairs, prob)
    lines = []
    for index, (classes, single, partners) in enumerate(plan):
        rng = np.random.default_rng([seed, split_id, index])
        image, label, clutter_map = render(rng, classes, num_fg, height, width, single,
                                           clutter_ids=writer.clutter_ids, partners=partners,
                                           looks=getattr(writer, "looks", None))
        line = writer.write(tmp, split, index, image, label, clutter_map)
        if line is not None:
            lines.append(line)
    writer.finish(tmp, split, lines)


def is_synthetic(root: str) -> bool:
    """Whether ``root`` was written by this generator (its marker file; readers ignore it)."""
    return os.path.isfile(os.path.join(root, MARKER))


def parse_pair(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)`` (argparse ``type`` of ``--cooccur``)."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two class ids A:B, got {text!r}") from None
    return a, b


def generate(root: str, layout: str = "voc", *, size: int = 96, n_train: int | None = None,
             n_val: int | None = None, seed: int = 0, force: bool = False, cooccur=(),
             cooccur_prob: float = 0.9) -> dict:
    """Write the synthetic dataset at ``root`` (atomically); returns a summary dict. ``cooccur``: class-id pairs
    drawn together with probability ``cooccur_prob`` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if size < 16:
        raise UserError(f"--size {size} is too small; use at least 16 pixels")
    parts = _parts(layout)
    spec = parts[0]
    pairs = [tuple(int(c) for c in pair) for pair in cooccur]
    for a, b in pairs:
        if a == b or not (1 <= a < spec.num_classes and 1 <= b < spec.num_classes):
            raise UserError(f"--cooccur {a}:{b}: two different foreground class ids in 1..{spec.num_classes - 1}")
    if not 0.0 <= cooccur_prob <= 1.0:
        raise UserError(f"--cooccur_prob must be in [0, 1], got {cooccur_prob}")
    counts = [(part.train if n_train is None else n_train, part.val if n_val is None else n_val) for part in parts]
    n_train, n_val = counts[0]
    root = os.path.abspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)) and not force:
        raise UserError(f"{root!r} exists and is not empty; choose another folder or pass --force to replace it")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        os.makedirs(tmp)
        for part_index, part in enumerate(parts):
            for sub in part.dirs:
                os.makedirs(os.path.join(tmp, sub))
            part_seed = seed + 7919 * part_index  # the parts of a cross-dataset layout hold different images
            _write_split(tmp, part, "train", counts[part_index][0], size, part_seed, pairs, cooccur_prob)
            _write_split(tmp, part, "val", counts[part_index][1], size, part_seed, pairs, cooccur_prob)
        marker = {"layout": layout, "size": size, "train": n_train, "val": n_val, "seed": seed}
        if pairs:
            marker.update(cooccur=[list(p) for p in pairs], cooccur_prob=cooccur_prob)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as handle:
            json.dump(marker, handle)
        if os.path.exists(root):
            old = os.path.join(parent, f".{os.path.basename(root)}.old-{os.getpid()}")
            os.rename(root, old)
            os.rename(tmp, root)
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.unlink(old)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(root=root, layout=layout, train=n_train, val=n_val, size=size, seed=seed,
                seconds=round(time.perf_counter() - start, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (refused if it exists and is not empty, unless --force)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="voc")
    parser.add_argument("--size", type=int, default=96, help="image height in pixels (Cityscapes: width = 2x)")
    parser.add_argument("--train", type=int, default=None, help="train images (default per layout)")
    parser.add_argument("--val", type=int, default=None, help="val images (default per layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cooccur", type=parse_pair, action="append", default=[], metavar="A:B",
                        help="draw classes A and B together (class ids of the real label space; repeatable)")
    parser.add_argument("--cooccur_prob", type=float, default=0.9,
                        help="probability that an image holding one class of a pair also holds the other")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty ROOT")
    args = parser.parse_args(argv)
    try:
        info = generate(args.root, args.layout, size=args.size, n_train=args.train, n_val=args.val, seed=args.seed,
                        force=args.force, cooccur=args.cooccur, cooccur_prob=args.cooccur_prob)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info['layout']} dataset at {info['root']}: {info['train']} train / {info['val']} val images "
          f"of {info['size']} px in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
