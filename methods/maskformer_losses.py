"""Mask-classification losses of MaskFormer as SimFormer uses them for weak-shot segmentation (simformer.md sections
3-4; bcmi/SimFormer ``hungarian_matcher.py``, ``prop_criterion.py``, ``loss_func.py``; re-implemented from those
facts): Hungarian matching of proposals to the classes of an image, where base classes (pixel masks) cost
classification and mask terms and novel classes (image labels only) classification alone; cross-entropy with a
down-weighted no-object class; sigmoid focal + dice on base masks only; SimFormer's complementary loss; MaskFormer's
semantic inference. Pure functions on tensors (the term: ``methods/mask_classification.py``).

Per image, the targets are ``labels`` (T,) class ids, ``masks`` (T, H, W) in {0, 1} at the prediction's resolution
(rows of novel classes are zeros) and ``has_mask`` (T,) bool (False for novel classes).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
MASK_FOCAL_WEIGHT, MASK_DICE_WEIGHT = 20.0, 1.0
NO_OBJECT_WEIGHT = 0.1  # MaskFormer's eos_coef
IGNORE_PROPOSAL_LOGIT = -2.9444  # logit(0.05): SimFormer's constant "ignore proposal" in the complementary loss


def _full(x: Tensor) -> Tensor:
    """Half-precision tensors in float32; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pairwise_focal(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> Tensor:
    """(Q, T) mean over the P pixels of the sigmoid focal loss of every proposal's mask logits (Q, P) against every
    target mask (T, P)."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits),
                                                                          reduction="none")
    neg = (1 - alpha) * prob ** gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                          reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, T) dice loss with +1 smoothing between every proposal's sigmoid mask and every target mask."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def match(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor, has_mask: Tensor, *,
          cls_weight: float = 1.0, novel_cls_weight: float = 1.0, mask_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hungarian matching of the Q proposals (class logits (Q, K + 1), mask logits (Q, H, W)) to the T targets of one
    image; returns (proposal indices, target indices). Cost of target j: ``-w_cls p_q(c_j)`` plus, for a target with a
    mask, ``w_mask (20 focal + 1 dice)``; a target without a mask (novel) costs its classification term alone
    (SimFormer's split configs: all weights 1). SciPy's solver."""
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    prob = _full(class_logits).softmax(-1)[:, labels]  # (Q, T)
    weights = torch.where(has_mask, torch.full_like(prob[0], cls_weight), torch.full_like(prob[0], novel_cls_weight))
    cost = -prob * weights
    flat = _full(mask_logits).flatten(1)
    target = masks.to(flat.dtype).flatten(1)
    mask_cost = MASK_FOCAL_WEIGHT * pairwise_focal(flat, target) + MASK_DICE_WEIGHT * pairwise_dice(flat, target)
    cost = cost + mask_weight * mask_cost * has_mask.to(cost.dtype)[None, :]
    # a diverged model's costs are not finite: match anyway, the non-finite loss is then reported by the loop
    rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=1e9, posinf=1e9, neginf=-1e9).cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def classification_loss(class_logits: Tensor, matched: list[tuple[Tensor, Tensor]], labels: list[Tensor],
                        no_object_weight: float = NO_OBJECT_WEIGHT) -> Tensor:
    """Cross-entropy over K + 1 of every proposal of the batch ((B, Q, K + 1)): matched proposals -> their target's
    class (base and novel alike), the others -> no-object, whose class weight is ``no_object_weight``."""
    b, q, k1 = class_logits.shape
    target = torch.full((b, q), k1 - 1, dtype=torch.long, device=class_logits.device)
    for i, (rows, cols) in enumerate(matched):
        target[i, rows.to(target.device)] = labels[i][cols].to(target.device)
    weight = torch.ones(k1, device=class_logits.device, dtype=_full(class_logits).dtype)
    weight[-1] = no_object_weight
    return F.cross_entropy(_full(class_logits).transpose(1, 2), target, weight=weight)


def focal_loss(logits: Tensor, targets: Tensor, n_masks: float, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> Tensor:
    """MaskFormer's sigmoid focal loss: mean over pixels, summed over the masks (rows), divided by ``n_masks``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1).sum() / n_masks


def dice_loss(logits: Tensor, targets: Tensor, n_masks: float) -> Tensor:
    prob = logits.sigmoid()
    return (1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)).sum() / n_masks


def mask_losses(mask_logits: Tensor, matched: list[tuple[Tensor, Tensor]], masks: list[Tensor],
                has_mask: list[Tensor]) -> dict[str, Tensor]:
    """20 x focal + 1 x dice between the matched proposals of **base** targets and their masks ((B, Q, H, W) logits),
    normalised by the number of base masks of the batch; a novel target's proposal gets no mask loss (its mask is
    never read)."""
    preds, targets = [], []
    for i, (rows, cols) in enumerate(matched):
        keep = has_mask[i][cols]
        preds.append(mask_logits[i][rows[keep]].flatten(1))
        targets.append(masks[i][cols[keep]].flatten(1).to(_full(mask_logits).dtype))
    pred, target = torch.cat(preds), torch.cat(targets)
    n = max(float(pred.shape[0]), 1.0)
    if pred.shape[0] == 0:
        zero = mask_logits.sum() * 0
        return {"loss_mask_focal": zero, "loss_mask_dice": zero}
    return {"loss_mask_focal": MASK_FOCAL_WEIGHT * focal_loss(_full(pred), _full(target), n),
            "loss_mask_dice": MASK_DICE_WEIGHT * dice_loss(_full(pred), _full(target), n)}


def complementary_loss(mask_logits: Tensor, matched: list[tuple[Tensor, Tensor]], masks: list[Tensor],
                       has_mask: list[Tensor], valid: Tensor | None = None) -> Tensor:
    """SimFormer's complementary loss: per image with a novel class, the pixel-wise max of the mask logits of the
    proposals matched to its novel classes and of a constant logit(0.05) must equal the region no base class covers
    (padding, ``valid`` False, set to 0): 20 focal + 1 dice, averaged over those images (0 when none)."""
    losses = []
    for i, (rows, cols) in enumerate(matched):
        novel = ~has_mask[i][cols]
        if not bool(novel.any()):
            continue
        logits = _full(mask_logits[i][rows[novel]])
        constant = torch.full_like(logits[:1], IGNORE_PROPOSAL_LOGIT)
        union = torch.cat([logits, constant]).amax(0)
        base = masks[i][has_mask[i]].to(logits.dtype)
        region = 1 - (base.amax(0) if base.shape[0] else torch.zeros_like(union))
        if valid is not None:
            region = region * valid[i].to(region.dtype)
        flat, target = union.flatten()[None], region.flatten()[None]
        losses.append(MASK_FOCAL_WEIGHT * focal_loss(flat, target, 1.0) + MASK_DICE_WEIGHT * dice_loss(flat, target, 1.0))
    if not losses:
        return mask_logits.sum() * 0
    return torch.stack(losses).mean()


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """MaskFormer's semantic map: ``sum_q softmax(cls_q)[:K] * sigmoid(mask_q)`` -> (B, K, H, W) class scores."""
    return torch.einsum("bqk,bqhw->bkhw", _full(class_logits).softmax(-1)[..., :-1], _full(mask_logits).sigmoid())


def targets_from_label(label: np.ndarray | Tensor, novel: set[int], ignore: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """One image's targets from its label map (H, W) of the augmented crop, as SimFormer's mapper: one target per
    class present (base classes first, then novel); a novel class keeps its label but its mask is zeros
    (``has_mask`` False), so no loss can read its pixels."""
    label = torch.as_tensor(np.asarray(label)).long()
    present = [int(c) for c in torch.unique(label).tolist() if c != ignore]
    order = [c for c in present if c not in novel] + [c for c in present if c in novel]
    masks = torch.stack([(label == c) if c not in novel else torch.zeros_like(label, dtype=torch.bool)
                         for c in order]) if order else torch.zeros(0, *label.shape, dtype=torch.bool)
    return (torch.tensor(order, dtype=torch.long), masks.float(),
            torch.tensor([c not in novel for c in order], dtype=torch.bool))


def with_image_labels(targets: tuple[Tensor, Tensor, Tensor], classes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Targets of an image extended by classes known from its image label only (a weak-shot task's novel classes):
    appended after the others, without a mask."""
    labels, masks, has_mask = targets
    if not classes:
        return targets
    extra = torch.tensor(classes, dtype=labels.dtype, device=labels.device)
    return (torch.cat([labels, extra]), torch.cat([masks, masks.new_zeros(len(classes), *masks.shape[1:])]),
            torch.cat([has_mask, torch.zeros(len(classes), dtype=torch.bool, device=has_mask.device)]))


def set_losses(class_logits: Tensor, mask_logits: Tensor, targets: list[tuple[Tensor, Tensor, Tensor]],
               comp_weight: float = 0.0) -> dict[str, Tensor]:
    """One decoder layer's MaskFormer losses for a batch: match each image, then classification over every proposal
    and focal + dice on the matched base masks (masks compared at the prediction's resolution); with ``comp_weight``
    SimFormer's complementary loss too (``loss_mask_comp``)."""
    matched = [match(class_logits[i].detach(), mask_logits[i].detach(), *targets[i])
               for i in range(class_logits.shape[0])]
    out = {"loss_mask_cls": classification_loss(class_logits, matched, [t[0] for t in targets])}
    out.update(mask_losses(mask_logits, matched, [t[1] for t in targets], [t[2] for t in targets]))
    if comp_weight > 0:
        out["loss_mask_comp"] = comp_weight * complementary_loss(mask_logits, matched, [t[1] for t in targets],
                                                                 [t[2] for t in targets])
    return out
