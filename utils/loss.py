"""Pure loss functions (no state, no config). Shapes: B batch, C classes, H x W pixels.

Every per-pixel function returns a (B, H, W) map with ignored pixels set to 0; callers take the mean over all
pixels (ignored ones included in the denominator), as the reference does (behaviour.md 2.1).
Notation: ``n_old`` = classes of previous steps including background; logits of the new model have C >= n_old
channels, old-model logits have exactly n_old channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.constants import IGNORE_INDEX

ENTROPY_EPS = 1e-8  # inside log(p + eps) in PLOP's entropy


def upcast(x: Tensor) -> Tensor:
    """Half / bfloat16 (autocast) -> float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel ``-log p_y``; ignored pixels give 0.  logits (B,C,H,W), labels (B,H,W) -> (B,H,W)."""
    return F.cross_entropy(upcast(logits), labels, ignore_index=ignore_index, reduction="none")


def unbiased_cross_entropy(logits: Tensor, labels: Tensor, n_old: int, mask: Tensor | None = None,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
    """MiB unbiased CE: background absorbs the probability of every old class (behaviour.md 2.2).

    Args:
        logits: (B, C, H, W) new-model logits.
        labels: (B, H, W); labels below ``n_old`` are treated as background.
        n_old: classes of previous steps incl. background (> 0).
        mask: optional (B, H, W) bool; True pixels are ignored.
    Returns:
        (B, H, W) per-pixel loss, 0 on ignored pixels.
    """
    x = upcast(logits)
    log_den = torch.logsumexp(x, dim=1)  # (B,H,W)
    log_p = torch.empty_like(x)
    log_p[:, 0] = torch.logsumexp(x[:, :n_old], dim=1) - log_den  # log(p_bg + sum_old p_c)
    log_p[:, 1:n_old] = 0.0  # never indexed: those labels were mapped to 0
    log_p[:, n_old:] = x[:, n_old:] - log_den.unsqueeze(1)
    y = torch.where(labels < n_old, torch.zeros_like(labels), labels)
    if mask is not None:
        y = torch.where(mask, torch.full_like(y, ignore_index), y)
    return F.nll_loss(log_p, y, ignore_index=ignore_index, reduction="none")


def _one_hot_ignore(labels: Tensor, n_classes: int, ignore_index: int,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(B,H,W) labels -> ((B,C,H,W) float one-hot with all-zero rows at ignored pixels, (B,H,W) bool valid)."""
    valid = labels != ignore_index
    # a comparison, not F.one_hot: one_hot checks the label range with .item() (a host sync) on some devices
    classes = torch.arange(n_classes, device=labels.device).view(1, n_classes, 1, 1)
    onehot = (labels.unsqueeze(1) == classes) & valid.unsqueeze(1)
    return onehot.to(dtype), valid


def bce_with_ignore(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """One-hot binary CE with logits summed over classes; 0 on ignored pixels.  (B,C,H,W),(B,H,W) -> (B,H,W)."""
    x = upcast(logits)
    target, valid = _one_hot_ignore(labels, x.shape[1], ignore_index, x.dtype)
    loss = F.binary_cross_entropy_with_logits(x, target, reduction="none").sum(dim=1)
    return loss * valid


def icarl_distillation(logits: Tensor, logits_old: Tensor) -> Tensor:
    """LwF-MC "combined" term: mean BCE between old-class logits and ``sigmoid(old logits)`` (scalar).

    The caller multiplies by ``n_old`` (a sum over classes instead of a mean) and ``--icarl_importance``.
    """
    n_old = logits_old.shape[1]
    return F.binary_cross_entropy_with_logits(upcast(logits[:, :n_old]), torch.sigmoid(upcast(logits_old)))


def icarl_disjoint(logits: Tensor, labels: Tensor, logits_old: Tensor, bkg: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """LwF-MC "disjoint": BCE whose old-class one-hot targets are replaced by ``sigmoid(old logits)``.

    With ``bkg`` the background target stays one-hot. Not masked for ignored pixels (old-class targets exist there
    too), as in the reference.  Returns (B, H, W), summed over classes.
    """
    x = upcast(logits)
    target, _ = _one_hot_ignore(labels, x.shape[1], ignore_index, x.dtype)
    n_old = logits_old.shape[1]
    first = 1 if bkg else 0
    target[:, first:n_old] = torch.sigmoid(upcast(logits_old)[:, first:]).to(x.dtype)
    return F.binary_cross_entropy_with_logits(x, target, reduction="none").sum(dim=1)


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 1.0, gamma: float = 2.0,
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``alpha * (1 - exp(-CE))**gamma * CE`` per pixel.  (B,C,H,W),(B,H,W) -> (B,H,W)."""
    ce = cross_entropy(logits, labels, ignore_index)
    return alpha * (1.0 - torch.exp(-ce)) ** gamma * ce


def focal_loss_new(logits: Tensor, labels: Tensor, n_old: int, alpha: float = 1.0, gamma: float = 2.0,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Focal loss on pixels labelled ``>= n_old`` (ignored pixels included, they are 0 anyway), CE elsewhere."""
    ce = cross_entropy(logits, labels, ignore_index)
    focal = alpha * (1.0 - torch.exp(-ce)) ** gamma * ce
    return torch.where(labels >= n_old, focal, ce)


def soft_cross_entropy(logits: Tensor, labels: Tensor, logits_old: Tensor, certain: Tensor,
                       factor: float = 1.0) -> Tensor:
    """PLOP's ``--pseudo_soft`` loss, per pixel (B, H, W), with the sign of its soft term corrected.

    Certain pixels: CE on ``labels``. Other pixels: ``factor * -sum_c softmax(x[:, :C_old])_c log softmax(x_old)_c``,
    a cross-entropy between the new model's distribution over the old classes and the old model's. The reference
    added ``+sum_c ...`` (a negative cross-entropy: minimising it pushed away from the old model, behaviour.md 8.1 #20).
    """
    n_old = logits_old.shape[1]
    hard = cross_entropy(logits, labels)
    p_new = torch.softmax(upcast(logits[:, :n_old]), dim=1)  # (B, C_old, H, W)
    soft = -(p_new * torch.log_softmax(upcast(logits_old), dim=1)).sum(dim=1)
    return torch.where(certain, hard, factor * soft)


def knowledge_distillation(logits: Tensor, logits_old: Tensor, alpha: float = 1.0) -> Tensor:
    """LwF KD (behaviour.md 2.3): new logits restricted to old classes, mean over classes.

    Returns the per-pixel loss ``-(1/C_old) sum_c q_c log softmax(x[:, :C_old])_c`` with ``q = softmax(alpha*x_old)``,
    (B, H, W); not masked for ignored pixels.
    """
    n_old = logits_old.shape[1]
    log_p = torch.log_softmax(upcast(logits[:, :n_old]), dim=1)
    q = torch.softmax(alpha * upcast(logits_old), dim=1)
    return -(q * log_p).mean(dim=1)


def unbiased_knowledge_distillation(logits: Tensor, logits_old: Tensor, alpha: float = 1.0) -> Tensor:
    """MiB unbiased KD (behaviour.md 2.3): the new-model background absorbs every new class.

    Args:
        logits: (B, C, H, W) with C > C_old.
        logits_old: (B, C_old, H, W).
    Returns:
        (B, H, W) per-pixel loss ``-(q_0 log p_bg+new + sum_{c=1}^{C_old-1} q_c log p_c) / C_old``.
    """
    x = upcast(logits)
    n_old = logits_old.shape[1]
    log_den = torch.logsumexp(x, dim=1, keepdim=True)  # (B,1,H,W)
    bg_and_new = torch.cat([x[:, :1], x[:, n_old:]], dim=1)
    log_p_bg = torch.logsumexp(bg_and_new, dim=1, keepdim=True) - log_den
    log_p_old = x[:, 1:n_old] - log_den
    log_p = torch.cat([log_p_bg, log_p_old], dim=1)  # (B,C_old,H,W)
    q = torch.softmax(alpha * upcast(logits_old), dim=1)
    return -(q * log_p).sum(dim=1) / n_old


def feature_distillation(features: Tensor, features_old: Tensor) -> Tensor:
    """ILT: mean squared error over all elements (scalar)."""
    return F.mse_loss(upcast(features), upcast(features_old))


def plop_entropy(probs: Tensor) -> Tensor:
    """PLOP's "normalised" entropy: ``-(1/log C) * mean_c p_c log(p_c + 1e-8)``, in [0, 1/C].

    The mean over classes (instead of a sum) is the reference's quirk (behaviour.md 8.1 #16); the 0.001 threshold of
    the PLOP preset is calibrated on it.  probs (B, C, H, W) -> (B, H, W).
    """
    c = probs.shape[1]
    return -(probs * torch.log(probs + ENTROPY_EPS)).mean(dim=1) / torch.log(torch.tensor(float(c)))


def normalized_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy divided by ``log C``, in [0, 1].  probs (B, C, H, W) -> (B, H, W)."""
    c = probs.shape[1]
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(dim=1) / torch.log(torch.tensor(float(c)))
