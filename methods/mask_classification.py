"""MaskFormer's set losses as a loss term (``--mask_loss W``) for models with a mask-classification head
(``--head maskformer``): per image, one target per class of its (masked) training label, Hungarian matching,
classification with the down-weighted no-object class, focal + dice on the masks, on the last decoder layer and
every auxiliary one (deep supervision). Formulas: ``methods/maskformer_losses.py``."""
from __future__ import annotations

import argparse
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from methods.base import Batch, LossTerm, StepContext
from methods.maskformer_losses import set_losses, targets_from_label
from methods.registry import register_term
from modules.registry import HEADS
from utils.errors import UserError
from utils.flags import nonnegative_float


@register_term
class MaskClassificationLoss(LossTerm):
    name = "mask_classification"
    order = 21

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--mask_loss", type=nonnegative_float, default=0.0,
                            help="weight of MaskFormer's set losses (matching, classification with no-object, "
                                 "mask focal + dice, deep supervision) for --head maskformer; 0: off")

    def __init__(self, weight: float):
        self.weight = weight

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "MaskClassificationLoss | None":
        weight = getattr(cfg, "mask_loss", 0.0)
        if weight <= 0:
            return None
        head = getattr(cfg, "head", None)
        if getattr(HEADS.get(head), "classifies", "pixels") != "queries":
            raise UserError(f"--mask_loss trains a mask-classification head (one whose classifiers read queries, e.g. "
                            f"--head maskformer); this run's head is {head or 'the backbone default'}: drop it")
        return cls(weight)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        extras = batch.extras
        size = extras["mask_pred"].shape[-2:]
        labels = F.interpolate(batch.labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        targets = [targets_from_label(label.cpu(), novel=set()) for label in labels]
        targets = [tuple(t.to(labels.device) for t in target) for target in targets]
        layers = [(extras["mask_cls"], extras["mask_pred"])] + [(a["mask_cls"], a["mask_pred"])
                                                                for a in extras["aux_outputs"]]
        out: dict[str, Tensor] = {}
        for cls_logits, mask_logits in layers:
            for key, value in set_losses(cls_logits, mask_logits, targets).items():
                out[key] = out.get(key, 0) + self.weight * value
        return out
