"""SimFormer's losses at WILSON's weak incremental steps (weak-steps.md section 4, option B; an unpublished
combination): the complementary loss in its per-pixel form and the pixel-pixel similarity transfer, on DeepLab's
segmentation logits and ``pre_logits`` at the head's resolution.

SimFormer has base masks in the images of its novel classes; a weak step has none, so its base region comes from
WILSON's Eq. 7 target q (the old model's sigmoid for background and old classes, the localizer's for new ones): a
pixel is **base** with label k when k = argmax_c q_c is background or an old class and q_k > ``conf``, **non-base**
when the argmax is a new class, ignored otherwise. Both losses start with WILSON's pseudo-labels (``--pseudo_ep``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from methods.maskformer_losses import (FOCAL_ALPHA, FOCAL_GAMMA, IGNORE_PROPOSAL_LOGIT, MASK_DICE_WEIGHT,
                                       MASK_FOCAL_WEIGHT)
from methods.pixel_pairs import BalanceCounts, SimNet, choose_partners, distillation_loss, similarity_loss

EPS = 1e-6


def weak_step_regions(target: Tensor, n_old: int, conf: float) -> tuple[Tensor, Tensor]:
    """From WILSON's target (B, C, h, w): ``(labels, non_base)``: labels (B, h, w) = the argmax class where it is
    background or an old class scoring above ``conf``, 255 elsewhere; non_base (B, h, w) = the argmax is a new class."""
    value, k = target.max(1)
    base = (k < n_old) & (value > conf)
    return torch.where(base, k, torch.full_like(k, 255)), k >= n_old


def pixel_complementary_loss(logits_new: Tensor, img_labels: Tensor, base: Tensor, valid: Tensor) -> Tensor:
    """The complementary loss on per-pixel logits: per image with a labelled new class, R = max(max over its
    labelled new classes c of z_c, logit(0.05)) against 1 - base over the valid pixels, 20 focal (mean over them)
    + dice; the mean over those images (0 when none). ``logits_new`` (B, N, h, w), ``img_labels`` (B, N)."""
    labelled = img_labels.bool()
    union = logits_new.masked_fill(~labelled[:, :, None, None], float("-inf")).amax(1)
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
    """The losses of one weak step; ``simnet`` None: no pixel pairs."""

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

    def loss(self, target: Tensor, logits: Tensor, pre_logits: Tensor, img_labels_new: Tensor) -> dict[str, Tensor]:
        """``target`` WILSON's Eq. 7 target (B, C, h, w), ``logits`` the segmentation logits at the same size (with
        gradient), ``pre_logits`` (B, D, h, w), ``img_labels_new`` (B, N)."""
        labels, non_base = weak_step_regions(target, self.n_old, self.conf)
        base = labels != 255
        out = {}
        if self.comp > 0:
            out["loss_simformer_comp"] = self.comp * pixel_complementary_loss(
                logits[:, self.n_old:].float(), img_labels_new, base, base | non_base)
        if self.simnet is None:
            return out
        flat = pre_logits.float().flatten(2).transpose(1, 2)  # (B, h*w, D)
        partners = choose_partners(img_labels_new, "cross")
        out["loss_simformer_pairs"] = self.pairs * similarity_loss(self.simnet, self.counts, flat, labels, partners,
                                                                   self.points)
        if self.distill > 0:
            scores = logits[:, self.n_old:].float().sigmoid().flatten(2).transpose(1, 2)  # (B, h*w, N)
            out["loss_simformer_distill"] = self.distill * distillation_loss(
                self.simnet, scores, flat, non_base.flatten(1), partners, img_labels_new, self.points, self.func,
                self.student)
        return out
