"""The stages of weakly-supervised segmentation from image labels, each writing files the next reads (docs/wsss.md):

1. ``train_cam``: IRN's classification network on image labels (optionally with CSD) -> ``{out}/cam_net.pth``;
   an in-stage checkpoint after every epoch, from which a killed run continues.
2. ``make_cam``: multi-scale CAMs of every training image -> ``{out}/cams/{image}.npz`` (skips the files present).
3. ``make_masks``: CAM seeds and IRN's confident masks -> ``{out}/masks/{image}.png``; seed and mask mIoU against the
   training images' ground truth -> ``{out}/wsss.json``.

Segmentation then trains the framework's DeepLab on the masks (``wsss.py train_seg``: ``run.py --task offline
--train_labels {out}/masks``).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dataset.incremental import class_presence
from dataset.readers import READERS
from dataset.transform import IMAGENET_MEAN, IMAGENET_STD
from utils.checkpoint import safe_load
from utils.errors import UserError
from utils.io import atomic_save_torch, atomic_write, atomic_write_text
from utils.progress import Meter
from weaksup import csd as csd_lib
from weaksup.cam import CAMNet, classification_loss, multiscale_cams, poly_lr
from weaksup.masks import SEED_BG, confident_mask, confusion, labels_from_cams, miou

log = logging.getLogger(__name__)


def normalise(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def irn_train_transform(image: Image.Image, rng: np.random.Generator, resize_long: tuple[int, int],
                        crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's classification augmentation: the long side resized to a random length in ``resize_long``, normalised,
    mirrored with probability 1/2, a random ``crop`` x ``crop`` window (zero padding where the image is smaller).
    Returns the image and a (crop, crop) bool mask of the pixels that come from it."""
    w, h = image.size
    target = int(rng.integers(resize_long[0], resize_long[1] + 1))
    scale = target / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    x = normalise(image)
    if rng.random() < 0.5:
        x = x.flip(-1)
    _, hh, ww = x.shape
    out = torch.zeros(3, crop, crop)
    valid = torch.zeros(crop, crop, dtype=torch.bool)
    top = int(rng.integers(0, max(hh - crop, 0) + 1))
    left = int(rng.integers(0, max(ww - crop, 0) + 1))
    dy = int(rng.integers(0, max(crop - hh, 0) + 1))
    dx = int(rng.integers(0, max(crop - ww, 0) + 1))
    ch, cw = min(crop, hh), min(crop, ww)
    out[:, dy:dy + ch, dx:dx + cw] = x[:, top:top + ch, left:left + cw]
    valid[dy:dy + ch, dx:dx + cw] = True
    return out, valid


class ImageLabelSet(Dataset):
    """The training images with their image labels (classes 1..K present in the ground truth: the labels a WSSS
    method is given) and IRN's augmentation, seeded per (seed, epoch, index) so that any worker count gives the same
    batches."""

    def __init__(self, reader, img_labels: np.ndarray, *, resize_long, crop: int, seed: int):
        self.reader, self.img_labels, self.resize_long, self.crop, self.seed = reader, img_labels, resize_long, crop, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.reader)

    def item(self, index: int, salt: int = 0):
        rng = np.random.default_rng([self.seed, self.epoch, index, salt])
        image, valid = irn_train_transform(self.reader.load_image(index), rng, self.resize_long, self.crop)
        return image, torch.from_numpy(self.img_labels[index]), valid

    def __getitem__(self, index: int):
        image, labels, _ = self.item(index)
        return image, labels, index


def image_labels(reader, cache_dir: str | None) -> np.ndarray:
    """float32 (N, K): classes 1..K (K = the reader's classes minus background) present in each ground truth."""
    present = class_presence(reader, cache_dir)
    return present[:, 1:reader.NUM_CLASSES].astype(np.float32)


def stem(reader, index: int) -> str:
    return os.path.splitext(os.path.basename(reader.samples[index][0]))[0]


# ------------------------------------------------------------------------------------------------ stage 1
def train_cam(args, net: CAMNet, reader, device) -> str:
    """Train the CAM network (IRN's recipe; with ``args.csd`` also CSD's two KL terms); returns the weights' path."""
    final = os.path.join(args.out, "cam_net.pth")
    if os.path.isfile(final):
        log.info("train_cam: %s exists, nothing to do", final)
        return final
    labels = image_labels(reader, os.path.join(args.cache_root, reader.NAME))
    data = ImageLabelSet(reader, labels, resize_long=tuple(args.resize_long), crop=args.crop_size, seed=args.seed)
    steps_per_epoch = len(data) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"train_cam: {len(data)} training images are fewer than --batch_size {args.batch_size}")
    max_step = steps_per_epoch * args.epochs
    groups = net.param_groups(args.lr, args.weight_decay)
    # IRN's PolyOptimizer passes weight_decay as SGD's third positional argument, its momentum (docs/wsss.md)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.weight_decay)
    base = [g["lr"] for g in optimizer.param_groups]
    csd = CSDTerms(args, net, reader, labels, device) if args.csd else None
    partial = final + ".partial"
    start = 0
    if os.path.isfile(partial):
        state = safe_load(partial, "train_cam checkpoint")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        log.info("train_cam: continuing from %s after epoch %d", partial, start)
    for epoch in range(start, args.epochs):
        data.epoch = epoch
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        loader = DataLoader(torch.utils.data.Subset(data, order[:max_step // args.epochs * args.batch_size].tolist()),
                            batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, drop_last=True)
        meter = Meter(f"train_cam epoch {epoch + 1}/{args.epochs} (batches)", steps_per_epoch)
        sums: dict[str, float] = {}
        for i, (images, y, index) in enumerate(loader):
            step = epoch * steps_per_epoch + i
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = poly_lr(lr, step, max_step)
            images, y = images.to(device), y.to(device)
            losses = {"cls": classification_loss(net(images), y)}
            if csd is not None:
                losses.update(csd(index.tolist(), epoch))
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            meter.update(i + 1)
        meter.finish()
        log.info("train_cam epoch %d/%d: %s", epoch + 1, args.epochs,
                 " ".join(f"{k}={v / steps_per_epoch:.4g}" for k, v in sums.items()))
        atomic_save_torch({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                          partial)
    atomic_save_torch({"model": net.state_dict(), "classes": labels.shape[1]}, final)
    os.remove(partial)
    log.info("train_cam: wrote %s", final)
    return final


class CSDTerms:
    """CSD's consistency terms for one batch: every multi-label image of the batch gets a single-label source drawn
    by co-occurrence; both composites (its confident foreground, its confident background pasted into the multi-label
    image) are forwarded with the source, and each composite's maps are pulled to the source's at the pasted cells
    (KL, the source detached). The masks are the baseline's confident ones (``--csd_masks DIR`` of a finished
    baseline ``make_masks``), as the supplementary's Algorithm 1."""

    def __init__(self, args, net: CAMNet, reader, labels: np.ndarray, device):
        self.net, self.reader, self.labels, self.device = net, reader, labels, device
        self.mask_dir = args.csd_masks
        if not self.mask_dir or not os.path.isdir(self.mask_dir):
            raise UserError("--csd needs --csd_masks DIR: the masks/ folder of a finished baseline run (make_masks), "
                            "whose confident foreground and background CSD pastes")
        self.lambda_fg, self.lambda_bg = csd_lib.LAMBDA_ORDERS[args.csd_lambdas]
        sources, self.targets = csd_lib.domain_split(labels)
        pastable = np.array([self._has_foreground(int(i)) for i in sources], dtype=bool)
        log.info("CSD: %d single-label images (%d with a confident foreground in --csd_masks, the sources), %d "
                 "multi-label images", len(sources), int(pastable.sum()), len(self.targets))
        sources = sources[pastable]
        self.sampler = csd_lib.SourceSampler(labels, csd_lib.cooccurrence(labels, self.targets), sources)
        self.stride = int(net.body.output_shape()[net.body.out_feature].stride)
        self.seed, self.crop = args.seed, args.crop_size
        self.data = ImageLabelSet(reader, labels, resize_long=tuple(args.resize_long), crop=args.crop_size,
                                  seed=args.seed)
        self.targets_set = set(self.targets.tolist())

    def _mask_path(self, index: int) -> str:
        path = os.path.join(self.mask_dir, stem(self.reader, index) + ".png")
        if not os.path.isfile(path):
            raise UserError(f"--csd_masks: no mask {path} for training image {index}; run make_masks of the "
                            "baseline on the same data first")
        return path

    def _has_foreground(self, index: int) -> bool:
        mask = np.asarray(Image.open(self._mask_path(index)))
        return bool(((mask > 0) & (mask != 255)).any())

    def _source(self, index: int, epoch: int):
        """The source image (same augmentation stream as its training item) and its fg / bg masks, transformed alike."""
        self.data.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch, index, 7])
        image = self.reader.load_image(index)
        mask = Image.open(self._mask_path(index))
        state = rng.bit_generator.state
        x, valid = irn_train_transform(image, rng, self.data.resize_long, self.crop)
        rng.bit_generator.state = state  # the same draws for the mask: nearest resize, no normalisation
        m = _transform_mask(mask, rng, self.data.resize_long, self.crop)
        return x, (m > 0) & (m != 255) & valid, (m == 0) & valid

    def __call__(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        zero = self.net.classifier.weight.sum() * 0
        pairs = [i for i in indices if i in self.targets_set]
        if not pairs:
            return {"csd_fg": zero, "csd_bg": zero}
        rng = np.random.default_rng([self.seed, epoch, 13, *pairs])
        l_fg, l_bg = zero, zero
        for target_index in pairs:
            _, source_index = self.sampler.draw(self.labels[target_index], rng)
            target, _, _ = self.data.item(target_index, salt=3)
            source, fg, bg = self._source(source_index, epoch)
            if not fg.any():
                continue
            comp = csd_lib.composites(target, source, fg, bg, stride=self.stride, rng=rng)
            batch = torch.stack([source, comp["fg"], comp["bg"]]).to(self.device)
            p = csd_lib.cam_distribution(self.net.cams(batch))
            for key, weight in (("fg", self.lambda_fg), ("bg", self.lambda_bg)):
                where = csd_lib.cells(comp[f"{key}_where"], self.stride).to(self.device)
                shift = (comp[f"{key}_from"][0] // self.stride, comp[f"{key}_from"][1] // self.stride)
                kl = csd_lib.shifted_kl(p[0], p[1 if key == "fg" else 2], where, shift)
                if key == "fg":
                    l_fg = l_fg + weight * kl / len(pairs)
                else:
                    l_bg = l_bg + weight * kl / len(pairs)
        return {"csd_fg": l_fg, "csd_bg": l_bg}


def _transform_mask(mask: Image.Image, rng: np.random.Generator, resize_long, crop: int) -> torch.Tensor:
    """The geometric part of :func:`irn_train_transform` on a label image (nearest resize, 255 padding), drawing the
    same random numbers in the same order."""
    w, h = mask.size
    target = int(rng.integers(resize_long[0], resize_long[1] + 1))
    scale = target / max(w, h)
    mask = mask.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
    m = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())
    if rng.random() < 0.5:
        m = m.flip(-1)
    hh, ww = m.shape
    out = torch.full((crop, crop), 255, dtype=torch.uint8)
    top = int(rng.integers(0, max(hh - crop, 0) + 1))
    left = int(rng.integers(0, max(ww - crop, 0) + 1))
    dy = int(rng.integers(0, max(crop - hh, 0) + 1))
    dx = int(rng.integers(0, max(crop - ww, 0) + 1))
    ch, cw = min(crop, hh), min(crop, ww)
    out[dy:dy + ch, dx:dx + cw] = m[top:top + ch, left:left + cw]
    return out


# ------------------------------------------------------------------------------------------------ stage 2
def make_cam(args, net: CAMNet, reader, device) -> str:
    """Multi-scale CAMs of every training image (classes of its image label) -> ``{out}/cams/{image}.npz`` with
    ``keys`` (class ids 1..K) and ``cams`` (float16, k x H x W). Files already there are kept (a killed run
    continues)."""
    folder = os.path.join(args.out, "cams")
    os.makedirs(folder, exist_ok=True)
    labels = image_labels(reader, os.path.join(args.cache_root, reader.NAME))
    meter = Meter("make_cam (images)", len(reader))
    made = 0
    net.eval()
    for index in range(len(reader)):
        path = os.path.join(folder, stem(reader, index) + ".npz")
        if not os.path.isfile(path):
            classes = np.flatnonzero(labels[index] > 0)
            image = normalise(reader.load_image(index)).to(device)
            cams = multiscale_cams(net, image, torch.as_tensor(classes, device=device), tuple(args.scales))
            with atomic_write(path) as handle:
                np.savez(handle, keys=classes + 1, cams=cams.cpu().numpy().astype(np.float16))
            made += 1
        meter.update(index + 1)
    meter.finish()
    log.info("make_cam: %d CAM files written, %d already there, in %s", made, len(reader) - made, folder)
    return folder


# ------------------------------------------------------------------------------------------------ stage 3
def make_masks(args, reader) -> dict:
    """Seeds (background score ``--seed_bg``) and confident masks (``--conf_fg`` / ``--conf_bg``) from the CAM files;
    the masks are written as PNGs (255 = not sure); the seed and mask mIoU against the ground truth of the training
    images are returned and written to ``{out}/wsss.json``."""
    cams_dir, folder = os.path.join(args.out, "cams"), os.path.join(args.out, "masks")
    os.makedirs(folder, exist_ok=True)
    n = reader.NUM_CLASSES
    seed_conf, mask_conf = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    labelled = total = 0
    meter = Meter("make_masks (images)", len(reader))
    for index in range(len(reader)):
        name = stem(reader, index)
        path = os.path.join(cams_dir, name + ".npz")
        if not os.path.isfile(path):
            raise UserError(f"make_masks: no CAM file {path}; run make_cam first (same --out)")
        with np.load(path) as f:
            keys, cams = f["keys"], f["cams"].astype(np.float32)
        _, gt = reader.load(index)
        gt = np.asarray(gt)
        seeds = labels_from_cams(cams, keys, args.seed_bg)
        mask = confident_mask(cams, keys, args.conf_fg, args.conf_bg)
        seed_conf += confusion(seeds, gt, n)
        mask_conf += confusion(mask, gt, n)
        labelled += int((mask != 255).sum())
        total += mask.size
        out = os.path.join(folder, name + ".png")
        if not os.path.isfile(out):
            with atomic_write(out) as handle:
                Image.fromarray(mask).save(handle, format="PNG")
        meter.update(index + 1)
    meter.finish()
    seed_miou, seed_iou = miou(seed_conf)
    mask_miou, mask_iou = miou(mask_conf)
    result = {"seed_miou": 100 * seed_miou, "mask_miou": 100 * mask_miou, "mask_coverage": 100 * labelled / total,
              "seed_iou": seed_iou, "mask_iou": mask_iou, "images": len(reader), "seed_bg": args.seed_bg,
              "conf_fg": args.conf_fg, "conf_bg": args.conf_bg}
    atomic_write_text(os.path.join(args.out, "wsss.json"), json.dumps(result, indent=1))
    log.info("make_masks: seed mIoU %.2f %%, mask mIoU %.2f %% on the %.1f %% of pixels the masks label (%d images)",
             result["seed_miou"], result["mask_miou"], result["mask_coverage"], len(reader))
    return result


def build_reader(args):
    reader_cls = READERS[args.dataset]
    return reader_cls(args.data_root, "train")


__all__ = ["train_cam", "make_cam", "make_masks", "build_reader", "image_labels", "SEED_BG"]
