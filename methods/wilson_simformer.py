"""SimFormer's losses at WILSON's weak incremental steps (weak-steps.md section 4, option B; an unpublished
combination): the complementary loss in its per-pixel form and the pixel-pixel similarity transfer, on DeepLab's
segmentation logits and ``pre_logits`` at the head's resolution.

SimFormer has base masks in the images of its novel classes; a weak step has none, so its base region comes from
WILSON's Eq. 7 target q (the old model's sigmoid for background and old classes, the localizer's for new ones): a
pixel is **base** with label k when k = argmax_c q_c is background or an old class and q_k > ``conf``, **non-base**
when the argmax is a new class, ignored otherwise (``eq7``). Both losses then start with WILSON's pseudo-labels
(``--pseudo_ep``). The ``oldfg`` region reads the old model alone: base = its confident foreground (an old class other
than background whose sigmoid passes ``conf``), every other pixel, background included, is on the prediction side and
background joins the new classes there (in the complementary loss's max and in the distilled score vectors); it needs
no pseudo-label, so both losses act from the first epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.maskformer_losses import (FOCAL_ALPHA, FOCAL_GAMMA, IGNORE_PROPOSAL_LOGIT, MASK_DICE_WEIGHT,
                                       MASK_FOCAL_WEIGHT)
from methods.pixel_pairs import BalanceCounts, SimNet, choose_partners, distillation_loss, similarity_loss

EPS = 1e-6
REGIONS = ("eq7", "oldfg")
RESOLUTIONS = ("feature", "image")


def weak_step_regions(target: Tensor, n_old: int, conf: float) -> tuple[Tensor, Tensor]:
    """From WILSON's target (B, C, h, w): ``(labels, non_base)``: labels (B, h, w) = the argmax class where it is
    background or an old class scoring above ``conf``, 255 elsewhere; non_base (B, h, w) = the argmax is a new class."""
    value, k = target.max(1)
    base = (k < n_old) & (value > conf)
    return torch.where(base, k, torch.full_like(k, 255)), k >= n_old


def old_foreground_regions(old_logits: Tensor, conf: float) -> tuple[Tensor, Tensor]:
    """From the old model's logits (B, n_old, h, w): ``(labels, non_base)``: labels = the argmax old foreground class
    where its sigmoid passes ``conf``, 255 elsewhere; non_base = every other pixel (background included)."""
    value, k = old_logits[:, 1:].sigmoid().max(1)
    base = value > conf
    return torch.where(base, k + 1, torch.full_like(k, 255)), ~base


def pixel_complementary_loss(logits_new: Tensor, img_labels: Tensor, base: Tensor, valid: Tensor,
                             bg_logit: Tensor | None = None) -> Tensor:
    """The complementary loss on per-pixel logits: per image with a labelled new class, R = max(max over its
    labelled new classes c of z_c, logit(0.05)) against 1 - base over the valid pixels, 20 focal (mean over them)
    + dice; the mean over those images (0 when none). ``logits_new`` (B, N, h, w), ``img_labels`` (B, N);
    ``bg_logit`` (B, h, w), when given, joins the max (the ``oldfg`` region puts background on the prediction side)."""
    labelled = img_labels.bool()
    union = logits_new.masked_fill(~labelled[:, :, None, None], float("-inf")).amax(1)
    if bg_logit is not None:
        union = torch.maximum(union, bg_logit)
    union = union.clamp_min(IGNORE_PROPOSAL_LOGIT).flatten(1)
    target = (~base).flatten(1).to(union.dtype)
    weight = valid.flatten(1).to(union.dtype)
    prob = union.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(union, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA * weight).sum(1) / weight.sum(1).clamp_min(1)
    dice = 1 - (2 * (prob * target * weight).sum(1) + 1) / ((prob * weight).sum(1) + (target * weight).sum(1) + 1)
    per_image = MASK_FOCAL_WEIGHT * focal + MASK_DICE_WEIGHT * dice
    has_new = labelled.any(1).to(per_image.dtype)
    return (per_image * has_new).sum() / has_new.sum().clamp_min(1)


@dataclass
class WeakStepTransfer:
    """The losses of one weak step; ``simnet`` None: no pixel pairs. ``region`` eq7 / oldfg (see the module);
    ``resolution`` image: the complementary loss on the logits upsampled to the image (bilinear; the regions
    nearest), as SimFormer computes it on its upsampled masks."""

    n_old: int
    conf: float
    comp: float
    simnet: SimNet | None
    pairs: float
    distill: float
    points: int
    func: str
    student: str
    counts: BalanceCounts = field(default_factory=BalanceCounts)
    region: str = "eq7"
    resolution: str = "feature"

    @property
    def needs_pseudo_labels(self) -> bool:
        return self.region == "eq7"

    def regions(self, target: Tensor | None, old_logits: Tensor) -> tuple[Tensor, Tensor]:
        if self.region == "oldfg":
            return old_foreground_regions(old_logits, self.conf)
        return weak_step_regions(target, self.n_old, self.conf)

    def complementary(self, logits: Tensor, img_labels_new: Tensor, base: Tensor, valid: Tensor,
                      image_size: tuple[int, int]) -> Tensor:
        logits = logits.float()
        if self.resolution == "image":
            logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
            base, valid = (F.interpolate(m[:, None].float(), size=image_size, mode="nearest")[:, 0].bool()
                           for m in (base, valid))
        bg = logits[:, 0] if self.region == "oldfg" else None
        return pixel_complementary_loss(logits[:, self.n_old:], img_labels_new, base, valid, bg)

    def loss(self, target: Tensor | None, old_logits: Tensor, logits: Tensor, pre_logits: Tensor,
             img_labels_new: Tensor, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """``target`` WILSON's Eq. 7 target (B, C, h, w; None before the pseudo-labels, read by ``eq7`` only),
        ``old_logits`` the old model's (B, n_old, h, w), ``logits`` the segmentation logits at the same size (with
        gradient), ``pre_logits`` (B, D, h, w), ``img_labels_new`` (B, N), ``image_size`` the input's (H, W)."""
        labels, non_base = self.regions(target, old_logits)
        base = labels != 255
        out = {}
        if self.comp > 0:
            out["loss_simformer_comp"] = self.comp * self.complementary(logits, img_labels_new, base,
                                                                        base | non_base, image_size)
        if self.simnet is None:
            return out
        flat = pre_logits.float().flatten(2).transpose(1, 2)  # (B, h*w, D)
        partners = choose_partners(img_labels_new, "cross")
        out["loss_simformer_pairs"] = self.pairs * similarity_loss(self.simnet, self.counts, flat, labels, partners,
                                                                   self.points)
        if self.distill > 0:
            predicted = logits[:, self.n_old:] if self.region == "eq7" else torch.cat(
                [logits[:, :1], logits[:, self.n_old:]], 1)
            scores = predicted.float().sigmoid().flatten(2).transpose(1, 2)  # (B, h*w, N or 1 + N)
            out["loss_simformer_distill"] = self.distill * distillation_loss(
                self.simnet, scores, flat, non_base.flatten(1), partners, img_labels_new, self.points, self.func,
                self.student)
        return out
