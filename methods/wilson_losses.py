"""WILSON's losses and pseudo-labels as functions of tensors (weak-steps.md 2.3-2.6; paper Eq. 1-8, supplement
Eq. A3). Shapes: ``z`` localizer logits (B, C, h, w) over every class of the step (background, old, new);
``img_labels`` (B, n_new) the image labels of the step's classes; everything at the localizer's resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 3
FOCAL_LAMBDA = 0.01
ATT_EPS = 0.01
CAM_MODES = ("ngwp", "att", "gap")


def cam_scores(z: torch.Tensor, mode: str = "ngwp") -> torch.Tensor:
    """(B, C) image-level scores of the localizer maps. ``ngwp`` (paper Eq. 1-2): normalised global weighted pooling
    sum_i m_i z_i / (1 + sum_i m_i) with m = softmax over classes, plus the focal penalty
    (1 - mean m)^3 log(0.01 + mean m); ``att``: sum_i (m_i + 0.01) z_i / sum_i (m_i + 0.01); ``gap``: mean of z."""
    flat = z.flatten(2)
    if mode == "gap":
        return flat.mean(-1)
    m = flat.softmax(1)
    if mode == "att":
        return (flat * (m + ATT_EPS)).sum(-1) / (m + ATT_EPS).sum(-1)
    if mode != "ngwp":
        raise ValueError(f"unknown CAM mode {mode!r}; one of {CAM_MODES}")
    mean = m.mean(-1)
    return (flat * m).sum(-1) / (1.0 + m.sum(-1)) + (1 - mean) ** FOCAL_GAMMA * torch.log(FOCAL_LAMBDA + mean)


def image_label_loss(z: torch.Tensor, img_labels: torch.Tensor, mode: str = "ngwp") -> torch.Tensor:
    """l_CLS (Eq. 3): BCE with logits of the scores of the last ``n_new`` classes against the image labels, mean over
    images and classes."""
    scores = cam_scores(z, mode)[:, -img_labels.shape[1]:]
    return F.binary_cross_entropy_with_logits(scores, img_labels.to(scores.dtype))


def localization_prior_loss(z: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """l_LOC (Eq. 4): BCE with logits of the localizer's background and old-class maps against the old model's
    sigmoid at the same resolution, mean over every element."""
    return F.binary_cross_entropy_with_logits(z[:, :old_logits.shape[1]], torch.sigmoid(old_logits))


def mask_by_image_labels(maps: torch.Tensor, img_labels_all: torch.Tensor) -> torch.Tensor:
    """Channels 1.. of ``maps`` multiplied by the image labels of every class 1..C-1 (old ones 0 at a weak step: only
    background and the present new classes are kept). A new tensor."""
    out = maps.clone()
    out[:, 1:] = out[:, 1:] * img_labels_all[:, :, None, None].to(maps.dtype)
    return out


def binarize(maps: torch.Tensor) -> torch.Tensor:
    """1 where a channel reaches the maximum over channels (ties: several ones), else 0."""
    return (maps >= maps.max(1, keepdim=True)[0]).to(maps.dtype)


def soft_targets(m: torch.Tensor, old_logits: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6-7: ``(target, q)`` with q = alpha * onehot(argmax m) + (1 - alpha) m (``m``: the label-masked softmax of
    the localizer) and target = [sigmoid(old logits) for background and old classes, q for new classes], background
    replaced by min(sigmoid(old bg), q_bg)."""
    q = alpha * binarize(m) + (1 - alpha) * m
    n_old = old_logits.shape[1]
    old = torch.sigmoid(old_logits)
    target = torch.cat([old, q[:, n_old:]], 1)
    target[:, 0] = torch.min(target[:, 0], q[:, 0])
    return target, q


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, q: torch.Tensor,
                      img_labels: torch.Tensor) -> torch.Tensor:
    """l_SEG (Eq. 8): per-pixel BCE with logits summed over classes, mean over pixels, averaged over the images whose
    new classes with pseudo-label mass (sum of q > 0) are exactly their labelled ones."""
    batch = logits.shape[0]
    per_image = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).reshape(batch, -1).mean(-1)
    n_new = img_labels.shape[1]
    has_mass = q.flatten(2).sum(-1)[:, -n_new:] > 0
    weight = (has_mass == img_labels.bool()).all(1).to(per_image.dtype)
    return (weight * per_image).sum() / (weight.sum() + 1e-5)


def pseudo_gtmask(m: torch.Tensor, cutoff_fg: float = 0.6, cutoff_bg: float = 0.7,
                  cutoff_low: float = 0.2) -> torch.Tensor:
    """Binary masks (B, C, h, w) for the localizer's self-training (supplement Eq. A3): a pixel is positive for a
    channel when its score is above max(max of the channel * cutoff, cutoff_low) (cutoff 0.7 for background, 0.6 for
    the others); pixels positive for several channels are dropped."""
    flat = m.flatten(2)
    peak = flat.max(-1, keepdim=True)[0]
    cut = torch.full_like(peak, cutoff_fg)
    cut[:, :1] = cutoff_bg
    threshold = (peak * cut).clamp(min=cutoff_low)
    positive = (flat > threshold).to(m.dtype)
    positive = positive * (positive.sum(1, keepdim=True) <= 1).to(m.dtype)
    return positive.view_as(m)


def balanced_self_training_loss(z: torch.Tensor, pseudo_gt: torch.Tensor, img_labels_all: torch.Tensor,
                                ignore_index: int = 255) -> torch.Tensor:
    """Class-balanced cross-entropy of the localizer against its own binary masks: target = the positive channel
    (ignored where none), pixel weight (N - N_c) / (1 + N) with N_c the positives of its class and N their sum, mean
    over all pixels of an image; an image counts only when every labelled class and the background have positives."""
    z = F.interpolate(z, size=pseudo_gt.shape[-2:], mode="bilinear", align_corners=True)
    batch, classes = pseudo_gt.shape[:2]
    target = pseudo_gt.argmax(1)
    target[pseudo_gt.sum(1) < 1] = ignore_index
    counts = pseudo_gt.reshape(batch, classes, -1).sum(-1)
    total = counts.sum(-1, keepdim=True)
    class_weight = (total - counts) / (1 + total)
    pixel_weight = (pseudo_gt * class_weight[:, :, None, None]).sum(1).reshape(batch, -1)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none").reshape(batch, -1)
    expected = img_labels_all.sum(-1).to(loss.dtype) + 1
    found = (counts > 0).to(loss.dtype).sum(-1)
    weight = (expected == found).to(loss.dtype)
    return (weight * (pixel_weight * loss).mean(-1)).mean()
