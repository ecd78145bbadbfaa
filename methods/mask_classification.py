"""MaskFormer's set losses as a loss term (``--mask_loss W``) for models with a mask-classification head
(``--head maskformer``): per image, one target per class of its (masked) training label, Hungarian matching,
classification with the down-weighted no-object class, focal + dice on the masks, on the last decoder layer and
every auxiliary one (deep supervision); a weak-shot task's novel classes present in an image (``novel_labels`` of its
items) are targets without a mask, and ``--mask_comp`` adds SimFormer's complementary loss. Formulas:
``methods/maskformer_losses.py``."""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.base import Batch, LossTerm, StepContext
from methods.maskformer_losses import set_losses, targets_from_label, with_image_labels
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
        parser.add_argument("--mask_comp", type=nonnegative_float, default=0.0,
                            help="with --mask_loss: weight of SimFormer's complementary loss on images with classes "
                                 "known from image labels only (a weak-shot task's novel classes): the union of their "
                                 "proposals' masks must cover the region no labelled class covers (SimFormer: 0.15 "
                                 "COCO-Stuff-10K, 0.2 ADE20K; 0: off)")

    def __init__(self, weight: float, comp: float = 0.0):
        self.weight = weight
        self.comp = comp

    @classmethod
    def check(cls, cfg: Any) -> None:
        if getattr(cfg, "mask_comp", 0.0) > 0 and getattr(cfg, "mask_loss", 0.0) <= 0:
            raise UserError("--mask_comp is a part of the set losses: add --mask_loss W (e.g. 1) or drop it")

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "MaskClassificationLoss | None":
        weight = getattr(cfg, "mask_loss", 0.0)
        if weight <= 0:
            return None
        head = getattr(cfg, "head", None)
        if getattr(HEADS.get(head), "classifies", "pixels") != "queries":
            raise UserError(f"--mask_loss trains a mask-classification head (one whose classifiers read queries, e.g. "
                            f"--head maskformer); this run's head is {head or 'the backbone default'}: drop it")
        return cls(weight, getattr(cfg, "mask_comp", 0.0))

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        extras = batch.extras
        size = extras["mask_pred"].shape[-2:]
        labels = F.interpolate(batch.labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        image_labels = batch.aux.get("novel_labels")  # (B, C): classes known from image labels only
        extra = ([torch.nonzero(row).flatten().tolist() for row in image_labels.cpu()] if image_labels is not None
                 else [[] for _ in labels])
        targets = [with_image_labels(targets_from_label(label.cpu(), novel=set()), classes)
                   for label, classes in zip(labels, extra)]
        targets = [tuple(t.to(labels.device) for t in target) for target in targets]
        layers = [(extras["mask_cls"], extras["mask_pred"])] + [(a["mask_cls"], a["mask_pred"])
                                                                for a in extras["aux_outputs"]]
        out: dict[str, Tensor] = {}
        for cls_logits, mask_logits in layers:
            for key, value in set_losses(cls_logits, mask_logits, targets, self.comp).items():
                out[key] = out.get(key, 0) + self.weight * value
        return out
