"""CSD (Cross-domain Semantic Decoupling, BMVC 2023) on the classification stage of weakly-supervised segmentation:
single-label (source) images lend their confident foreground and, separately, their confident background to a
multi-label (target) image; the network's activation maps on both composites are pulled towards the source's maps
(KL, the source as the teacher), next to the classification loss on the multi-label image. Spec: csd.md, with its
section 4a (the supplementary's Algorithm 1) winning over the reconstruction. No code of CSD is public: the geometry
and the sampling below are reconstructions, each a parameter (docs/csd.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import UserError

LAMBDA_ORDERS = {"fg-bg": (0.01, 0.1), "bg-fg": (0.1, 0.01)}  # (lambda of the fg-paste KL, of the bg-paste KL)


def domain_split(img_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the single-label images (the source domain, one class) and the multi-label ones (the target
    domain, two classes or more); images without a class belong to neither."""
    counts = (np.asarray(img_labels) > 0).sum(1)
    return np.flatnonzero(counts == 1), np.flatnonzero(counts >= 2)


def cooccurrence(img_labels: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
    """``M[a, c]`` = number of images (of ``among``, default all) labelled with both a and c, a != c (diagonal 0)."""
    y = (np.asarray(img_labels) > 0).astype(np.int64)
    if among is not None:
        y = y[among]
    m = y.T @ y
    np.fill_diagonal(m, 0)
    return m


@dataclass
class SourceSampler:
    """Draws the single-label image to paste into a multi-label image by co-occurrence: the class c with probability
    proportional to ``sum_{a in A} M[a, c]`` over the classes that have a source image (A = the target's classes;
    uniform over them when every such count is 0), then a source image of class c uniformly."""

    img_labels: np.ndarray  # (N, K) image labels of the training set
    cooc: np.ndarray  # (K, K)
    sources: np.ndarray  # indices of the single-label images

    def __post_init__(self):
        labels = np.asarray(self.img_labels) > 0
        self.by_class = {int(c): self.sources[labels[self.sources, c]] for c in range(labels.shape[1])}
        self.available = np.array([len(self.by_class[c]) > 0 for c in range(labels.shape[1])])
        if not self.available.any():
            raise UserError("CSD needs single-label images (one class in the image label) and the training set has "
                            "none")

    def class_probabilities(self, target_labels: np.ndarray) -> np.ndarray:
        present = np.flatnonzero(np.asarray(target_labels) > 0)
        weights = self.cooc[present].sum(0).astype(np.float64) * self.available
        if weights.sum() == 0:
            weights = self.available.astype(np.float64)
        return weights / weights.sum()

    def draw(self, target_labels: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """``(class c, source image index)``."""
        c = int(rng.choice(len(self.available), p=self.class_probabilities(target_labels)))
        return c, int(rng.choice(self.by_class[c]))


def bounding_box(mask: Tensor) -> tuple[int, int, int, int] | None:
    """``(top, left, height, width)`` of the True pixels of a (H, W) mask; None when empty."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    top, left = int(rows[0]), int(cols[0])
    return top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1


def paste(target: Tensor, source: Tensor, alpha: Tensor, box: tuple[int, int, int, int],
          at: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Hard alpha paste: the ``box`` (top, left, h, w) of ``source`` (C, H, W) goes to ``at`` (top, left) of a copy of
    ``target`` (C, H', W') where ``alpha`` (H, W, bool, of the source) is set. Returns the composite and the pasted
    pixels (H', W', bool)."""
    top, left, h, w = box
    y, x = at
    if y < 0 or x < 0 or y + h > target.shape[-2] or x + w > target.shape[-1]:
        raise ValueError(f"a {h}x{w} box at {at} leaves the {tuple(target.shape[-2:])} target")
    out = target.clone()
    where = torch.zeros(target.shape[-2:], dtype=torch.bool, device=target.device)
    a = alpha[top:top + h, left:left + w]
    region = out[:, y:y + h, x:x + w]
    region[:, a] = source[:, top:top + h, left:left + w][:, a]
    where[y:y + h, x:x + w] = a
    return out, where


def random_offset(box_hw: tuple[int, int], size_hw: tuple[int, int], stride: int,
                  rng: np.random.Generator) -> tuple[int, int]:
    """A top-left position for a box inside ``size_hw``, a multiple of ``stride`` so that source and composite cells
    of the feature grid align."""
    out = []
    for extent, size in zip(box_hw, size_hw):
        room = (size - extent) // stride
        out.append(int(rng.integers(0, room + 1)) * stride if room >= 0 else 0)
    return out[0], out[1]


def composites(target: Tensor, source: Tensor, fg: Tensor, bg: Tensor, *, stride: int,
               rng: np.random.Generator) -> dict:
    """The two composites of CSD's Algorithm 1 for one (multi-label target, single-label source) pair.

    ``fg`` / ``bg``: (H, W) bool confident foreground / background masks of the source (from the baseline's CAMs).
    Foreground: the bounding box of ``fg``, box origin rounded down to the grid, pasted with alpha ``fg`` at a random
    grid-aligned offset. Background: a box of the same size at a random grid-aligned position of the source, alpha
    ``bg`` inside it, pasted the same way. Returns ``{"fg": image, "fg_where": mask, "fg_from": (dy, dx), "bg": ...}``
    where ``*_from`` is the shift from source to composite coordinates (composite = source + shift)."""
    out = {}
    box = bounding_box(fg)
    if box is None:
        raise UserError("a CSD source image has no confident foreground pixel (its CAM is below the threshold "
                        "everywhere): it cannot be a source")
    top, left, h, w = box
    top, left = top - top % stride, left - left % stride
    h = min(source.shape[-2] - top, h + (box[0] - top))
    w = min(source.shape[-1] - left, w + (box[1] - left))
    h, w = min(h, target.shape[-2]), min(w, target.shape[-1])
    at = random_offset((h, w), tuple(target.shape[-2:]), stride, rng)
    out["fg"], out["fg_where"] = paste(target, source, fg, (top, left, h, w), at)
    out["fg_from"] = (at[0] - top, at[1] - left)
    src_at = random_offset((h, w), tuple(source.shape[-2:]), stride, rng)
    at = random_offset((h, w), tuple(target.shape[-2:]), stride, rng)
    out["bg"], out["bg_where"] = paste(target, source, bg, (src_at[0], src_at[1], h, w), at)
    out["bg_from"] = (at[0] - src_at[0], at[1] - src_at[1])
    return out


def cam_distribution(cams: Tensor, bg_score: float | None = None) -> Tensor:
    """Per-pixel class distributions (B, K + 1, h, w) from activation maps (B, K, h, w): softmax over a background
    channel and the classes, the background logit ``1 - max_c cam`` (or the constant ``bg_score``)."""
    bg = 1 - cams.amax(1, keepdim=True) if bg_score is None else torch.full_like(cams[:, :1], bg_score)
    return torch.cat([bg, cams], 1).softmax(1)


def shifted_kl(p_source: Tensor, p_composite: Tensor, where: Tensor, shift: tuple[int, int]) -> Tensor:
    """Mean over the pasted cells of KL(sg(p_source) || p_composite): ``where`` (h, w) marks the composite's pasted
    cells, ``shift`` (cells) maps source to composite coordinates. 0 when nothing was pasted. Single image: (K, h, w)."""
    ys, xs = where.nonzero(as_tuple=True)
    if ys.numel() == 0:
        return p_composite.sum() * 0
    sy, sx = ys - shift[0], xs - shift[1]
    keep = (sy >= 0) & (sx >= 0) & (sy < p_source.shape[-2]) & (sx < p_source.shape[-1])
    ys, xs, sy, sx = ys[keep], xs[keep], sy[keep], sx[keep]
    if ys.numel() == 0:
        return p_composite.sum() * 0
    teacher = p_source.detach()[:, sy, sx]
    student = p_composite[:, ys, xs]
    return (teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(0).mean()


def cells(where: Tensor, stride: int) -> Tensor:
    """Pixel mask (H, W) -> cell mask (H / stride, W / stride): a cell counts when at least half of it was pasted."""
    pooled = F.avg_pool2d(where[None, None].float(), stride, stride)[0, 0]
    return pooled >= 0.5
