"""Pure loss functions (no state, no config): the one home of the framework's loss math; loss terms in methods/
compose them. Shapes: B batch, C classes, H x W pixels.

Every per-pixel function returns a (B, H, W) map with ignored pixels set to 0; callers take the mean over all
pixels (ignored ones included in the denominator), as the reference does (behaviour.md 2.1).
Notation: ``n_old`` = classes of previous steps including background; logits of the new model have C >= n_old
channels, old-model logits have exactly n_old channels.
"""
from __future__ import annotations

import math
from typing import Sequence

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


def bce_mean_over_valid(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """SSUL's ``BCEWithLogitsLossWithIgnoreIndex``: :func:`bce_with_ignore` (one-hot BCE summed over channels)
    averaged over the non-ignored pixels only (scalar)."""
    valid = labels != ignore_index
    return bce_with_ignore(logits, labels, ignore_index).sum() / valid.sum().clamp(min=1)


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


def collapse_new_classes(logits: Tensor, n_old: int) -> Tensor:
    """The new model's logits in the old label space: background + every new class summed (logits, not
    probabilities, as PLOP's POD and RCIL's PCKD do), old classes kept.  (B, C, h, w) -> (B, n_old, h, w)."""
    return torch.cat([logits[:, :1] + logits[:, n_old:].sum(dim=1, keepdim=True), logits[:, 1:n_old]], dim=1)


# ---------------------------------------------------------------------------------------------------- PLOP's POD
def pod_preprocess(x: Tensor, prepro: str) -> Tensor:
    """Elementwise map applied before pooling. ``abs`` is |x| (the reference's ``abs`` crashed)."""
    if prepro == "pow":
        return x.pow(2)
    if prepro == "abs":
        return x.abs()
    if prepro == "relu":
        return F.relu(x)
    return x


def _local_embed(x: Tensor, scales: Sequence[int]) -> Tensor:
    b, _, _, w = x.shape
    parts = []
    for scale in scales:
        k = w // scale  # the reference uses the width for both axes
        for i in range(scale):
            for j in range(scale):
                region = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                parts.append(region.mean(dim=3).reshape(b, -1))  # pooled over width: (B, C*k)
                parts.append(region.mean(dim=2).reshape(b, -1))  # pooled over height: (B, C*k)
    return torch.cat(parts, dim=1)


def _global_embed(x: Tensor, scales: Sequence[int]) -> Tensor:
    b, w = x.shape[0], x.shape[-1]
    parts = []
    for scale in scales:
        pooled = F.avg_pool2d(x, kernel_size=w // scale)  # (B, C, s, s) for square maps
        parts.append(pooled.sum(dim=2).reshape(b, -1))
        parts.append(pooled.sum(dim=3).reshape(b, -1))
    return torch.cat(parts, dim=1)


def pod_embed(x: Tensor, collapse: str = "local", scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """Pooled embedding of an already pre-processed map.  x (B, C, H, W) -> (B, D).

    ``spatial``: sums over H and over W of the whole map; ``local``: for each scale s, the s x s regions of side
    ``W // s`` pooled (mean) along width and along height; ``global``: average-pool pyramid summed along each axis.
    """
    if collapse == "spatial":
        b = x.shape[0]
        return torch.cat([x.sum(dim=3).reshape(b, -1), x.sum(dim=2).reshape(b, -1)], dim=1)
    if collapse == "local":
        return _local_embed(x, scales)
    if collapse == "global":
        return _global_embed(x, scales)
    raise ValueError(f"unknown POD collapse {collapse!r}")


# ---------------------------------------------------------------------------------------------------- RCIL's PCKD
PCKD_SPATIAL_KERNELS = (4, 8, 12, 16, 20, 24)


def _pckd_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over images of the L2 norm of the flattened per-image difference."""
    return (a - b).flatten(1).norm(dim=1).mean()


def pckd_spatial(old: Tensor, new: Tensor) -> Tensor:
    """Mean over the six window sizes of the distance between stride-1 average pools of the squared maps."""
    a, b = old.float() ** 2, new.float() ** 2
    return sum(_pckd_distance(F.avg_pool2d(a, k, stride=1, padding=k // 2),
                              F.avg_pool2d(b, k, stride=1, padding=k // 2))
               for k in PCKD_SPATIAL_KERNELS) / len(PCKD_SPATIAL_KERNELS)


def pckd_channel(old: Tensor, new: Tensor) -> Tensor:
    """Distance between the squared maps averaged over three neighbouring channels (zero-padded, stride 1)."""
    a, b = old.float() ** 2, new.float() ** 2

    def pool(x):
        return F.avg_pool2d(x.permute(0, 2, 1, 3), (3, 1), stride=1, padding=(1, 0)).permute(0, 2, 1, 3)
    return _pckd_distance(pool(a), pool(b))


def pckd_loss(old_maps: Sequence[Tensor], new_maps: Sequence[Tensor], old_logits: Tensor, new_logits: Tensor, *,
              n_old: int, n_classes: int, n_new: int, weights: Sequence[float]) -> Tensor:
    """RCIL's L_PCKD. ``*_maps``: the four backbone stages and the ASPP output; ``*_logits``: the logits before
    upsampling. ``weights``: (spatial of the maps, spatial of the logits, channel of the stages, channel of the last
    map); the class ratio ``sqrt(n_classes / n_new)`` scales both."""
    w_spa, w_spa_last, w_ch, w_ch_last = weights
    scale = math.sqrt(n_classes / n_new)
    if new_logits.shape[1] != old_logits.shape[1]:  # domain-incremental steps keep the classes
        new_logits = collapse_new_classes(new_logits, n_old)
    spatial_pairs = list(zip(old_maps, new_maps)) + [(old_logits, new_logits)]
    spatial = sum(pckd_spatial(a, b) * scale * (w_spa_last if i == len(spatial_pairs) - 1 else w_spa)
                  for i, (a, b) in enumerate(spatial_pairs)) / len(spatial_pairs)
    channel = sum(pckd_channel(a, b) * scale * (w_ch_last if i == len(old_maps) - 1 else w_ch)
                  for i, (a, b) in enumerate(zip(old_maps, new_maps))) / len(old_maps)
    return spatial + channel


# ---------------------------------------------------------------------------------------------------- DropClass
def suppression(drop_logits_small: Tensor, z: int) -> Tensor:
    """DropClass's L_sup: mean over images and pixels (feature resolution) of the dropped class's probability."""
    return F.softmax(drop_logits_small.float(), dim=1)[:, z].mean()


# ---------------------------------------------------------------------------------------------------- DKD / STAR
# Per-class sigmoid outputs (cvlab-yonsei/DKD, jinpeng0528/STAR; docs/dkd.md, docs/star.md). "pmean": the mean over
# images and positions of each channel, summed over channels.
def pmean(loss: Tensor) -> Tensor:
    """(B, C, H, W) elementwise losses -> mean over B, H, W per channel, summed over channels (scalar)."""
    return loss.mean(dim=(0, 2, 3)).sum()


def multilabel_bce(logits: Tensor, labels: Tensor, class_ids: Sequence[int], pos_weight: float = 1.0,
                   ignore_as_negative: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DKD's mBCE on the channels of ``class_ids`` (``logits`` (B, len(class_ids), H, W), the channels of those
    classes): target 1 where the label is the channel's class, else 0; positives weighted by ``pos_weight``.
    ``ignore_as_negative`` (the reference): ignored pixels are negatives of every channel and every pixel counts in
    the mean; False: ignored pixels contribute nothing and the mean is over the others. Per channel, summed."""
    return multilabel_bce_per_class(logits, labels, class_ids, pos_weight, ignore_as_negative, ignore_index).sum()


def multilabel_bce_per_class(logits: Tensor, labels: Tensor, class_ids: Sequence[int] | Tensor, pos_weight: float = 1.0,
                             ignore_as_negative: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """:func:`multilabel_bce` before the sum over channels: (len(class_ids),). ``class_ids`` may be a tensor already
    on the labels' device (a list is copied there at every call: a host synchronisation on a GPU)."""
    x = upcast(logits)
    ids = (class_ids if torch.is_tensor(class_ids) else torch.as_tensor(list(class_ids))).to(labels.device).view(1, -1, 1, 1)
    target = (labels.unsqueeze(1) == ids).to(x.dtype)
    weight = torch.full((), float(pos_weight), dtype=x.dtype, device=x.device)  # a fill, not a host copy
    loss = F.binary_cross_entropy_with_logits(x, target, pos_weight=weight, reduction="none")
    if ignore_as_negative:
        return loss.mean(dim=(0, 2, 3))
    valid = (labels != ignore_index).unsqueeze(1).to(x.dtype)
    return (loss * valid).sum(dim=(0, 2, 3)) / valid.sum().clamp(min=1)


def sigmoid_distillation(logits: Tensor, logits_old: Tensor) -> Tensor:
    """DKD's KD: BCE of each logit against the old model's sigmoid of the same channel, over every pixel (pmean).
    Its gradient is ``sigmoid(z) - sigmoid(z_old)``."""
    x = upcast(logits)
    return pmean(F.binary_cross_entropy_with_logits(x, torch.sigmoid(upcast(logits_old)), reduction="none"))


DKD_SPLITS = ("weight", "product")


def decomposed_logits(features: Tensor, weight: Tensor, split: str = "weight") -> tuple[Tensor, Tensor]:
    """The positive and negative parts ``(z+, z-)`` of the bias-free logits ``features @ weight.T`` at the
    features' resolution; ``features`` (B, D, h, w), ``weight`` (C, D). ``split="weight"`` (the reference code):
    by the sign of each weight, ``z+ = f . max(w, 0)``; ``"product"`` (the paper): by the sign of each product
    ``f_d w_d``. The two agree where ``f >= 0`` (ReLU features) and differ where a feature is negative."""
    if split not in DKD_SPLITS:
        raise ValueError(f"split must be one of {DKD_SPLITS}, got {split!r}")
    w = weight.reshape(weight.shape[0], -1, 1, 1).to(features.dtype)
    w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
    if split == "weight":
        return F.conv2d(features, w_pos), F.conv2d(features, w_neg)
    f_pos, f_neg = features.clamp(min=0), features.clamp(max=0)
    positive = F.conv2d(f_pos, w_pos) + F.conv2d(f_neg, w_neg)
    negative = F.conv2d(f_pos, w_neg) + F.conv2d(f_neg, w_pos)
    return positive, negative


def never_loss(logits: Tensor) -> Tensor:
    """DKD's auxiliary-classifier loss: mean over every element of ``-log(1 - sigmoid(z)) = softplus(z)``."""
    return F.softplus(upcast(logits)).mean()


def masked_feature_mse(features: Tensor, features_old: Tensor, weight: Tensor) -> Tensor:
    """STAR's OCFM: ``sum_{b,k,i} w(i) (f - f_old)^2 / (D * sum_i w(i))`` with ``weight`` (B, 1, h, w); 0 (not NaN)
    when the weights are all 0."""
    diff = (upcast(features) - upcast(features_old)).pow(2) * weight
    return diff.sum() / (features.shape[1] * weight.sum()).clamp(min=1e-12)


def prototype_separation(features: Tensor, class_masks: Tensor, prototypes: Tensor) -> Tensor:
    """STAR's SAD: for each new class c, the unit centre ``u_c = normalize(sum_{b,i} m_c(i) f(i)/|f(i)|)``, its
    distance to the nearest old prototype ``d_c``, and ``mean_c 1 / d_c``. ``class_masks`` (B, C_new, h, w) soft
    masks, ``prototypes`` (C_old, D) unit rows. A class absent from the batch has ``u_c = 0``, ``d_c = 1``."""
    unit = F.normalize(upcast(features), dim=1)
    centres = F.normalize(torch.einsum("bchw,bdhw->cd", upcast(class_masks), unit), dim=1)
    distances = torch.cdist(centres, upcast(prototypes)).min(dim=1).values
    return (1.0 / distances.clamp(min=1e-6)).mean()  # a centre on a prototype: large, not inf
