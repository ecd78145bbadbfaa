"""Output distillation (LwF KD, MiB unbiased KD) and ILT feature distillation (behaviour.md 2.3, 2.4)."""
from __future__ import annotations

import argparse
import math
from typing import Any

from torch import Tensor

from methods.registry import register_term
from methods.base import Batch, LossTerm, StepContext
from utils import loss as L
from utils.flags import CLASS_INCREMENTAL, IGNORED, NOT_IMPLEMENTED, declare, nonnegative_float, positive_float



@register_term
class KnowledgeDistillation(LossTerm):
    """``loss_kd = --loss_kd * mean_pixels(KD)`` at steps > 0; KD is LwF's (old classes only, mean over classes) or
    MiB's unbiased KD (``--unkd``). Not masked for ignored pixels, as in the reference."""

    name = "kd"
    order = 30
    needs_old_model = True
    unsupported = (
        ("kd_new", False, "KD restricted to background pixels"),
        ("kd_bce_sig", False, "BCE between sigmoids as KD"),
        ("kd_bce_sig_shape", "trim", "shape handling of --kd_bce_sig"),
        ("exkd_gt", False, "excluded KD with ground truth"),
        ("exkd_sum", False, "excluded KD with summed new channels"),
        ("kd_mask", None, "KD on a subset of pixels"),
        ("kd_mask_adaptative_factor", False, "area factor of --kd_mask"),
        ("temperature_apply", None, "temperature on the KD logits"),
        ("temperature", 1.0, "KD temperature (only used with --temperature_apply / excluded KD)"),
        ("temperature_semiold", 1.0, "semi-old temperature of excluded KD"),
    )

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--loss_kd", type=nonnegative_float, default=0.0,
                            help="weight of output distillation at steps > 0 (default 0 as PLOP/MiB; AWT used 10, "
                                 "LWF/ILT presets 100, MiB 10)")
        declare(parser.add_argument("--unkd", action="store_true", default=False,
                            help="MiB unbiased KD (new-model background absorbs the new classes)"),
                requires=CLASS_INCREMENTAL)
        parser.add_argument("--alpha", type=positive_float, default=1.0,
                            help="old logits are multiplied by alpha before the softmax in KD; also focal-loss alpha; "
                                 "with --method WILSON (or --weakly): the weight of the one-hot part of WILSON's soft "
                                 "pseudo-labels (WILSON's meaning of --alpha; its default there is 0.5)")
        parser.add_argument("--kd_scheduling", action="store_true", default=False,
                            help="multiply the KD loss by sqrt(classes seen / new classes)")
        parser.add_argument("--kd_need_labels", action="store_true", default=False,
                            help=IGNORED + "KD variant switch, never read by the reference")
        parser.add_argument("--kd_category", action="store_true", default=False,
                            help=IGNORED + "KD variant switch, never read by the reference")
        parser.add_argument("--kd_new", action="store_true", default=False, help=NOT_IMPLEMENTED + "KD on bg pixels")
        parser.add_argument("--kd_bce_sig", action="store_true", default=False, help=NOT_IMPLEMENTED + "BCE KD")
        parser.add_argument("--kd_bce_sig_shape", default="trim", choices=["trim", "sum"],
                            help=NOT_IMPLEMENTED + "shape handling of --kd_bce_sig")
        parser.add_argument("--exkd_gt", action="store_true", default=False, help=NOT_IMPLEMENTED + "excluded KD")
        parser.add_argument("--exkd_sum", action="store_true", default=False, help=NOT_IMPLEMENTED + "excluded KD")
        parser.add_argument("--kd_mask", default=None, choices=["oldbackground", "new"],
                            help=NOT_IMPLEMENTED + "KD on a subset of pixels")
        parser.add_argument("--kd_mask_adaptative_factor", action="store_true", default=False,
                            help=NOT_IMPLEMENTED + "area factor for --kd_mask")
        parser.add_argument("--temperature", type=float, default=1.0, help=NOT_IMPLEMENTED + "KD temperature")
        parser.add_argument("--temperature_semiold", type=float, default=1.0,
                            help=NOT_IMPLEMENTED + "semi-old temperature")
        parser.add_argument("--temperature_apply", default=None, choices=["all", "new", "old"],
                            help=NOT_IMPLEMENTED + "where the temperature applies")

    def __init__(self, *, weight: float, unbiased: bool, alpha: float, schedule: float = 1.0):
        self.weight = weight
        self.unbiased = unbiased
        self.alpha = alpha
        self.schedule = schedule  # sqrt(C / C_new) with --kd_scheduling, else 1

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "KnowledgeDistillation | None":
        weight = getattr(cfg, "loss_kd", 0.0)
        if weight <= 0 or ctx.model_old is None:
            return None
        schedule = math.sqrt(ctx.n_classes / ctx.n_new) if getattr(cfg, "kd_scheduling", False) else 1.0
        return cls(weight=weight, unbiased=getattr(cfg, "unkd", False), alpha=getattr(cfg, "alpha", 1.0),
                   schedule=schedule)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        fn = L.unbiased_knowledge_distillation if self.unbiased else L.knowledge_distillation
        loss = fn(batch.logits, batch.logits_old, self.alpha).mean()
        return {"loss_kd": self.weight * self.schedule * loss}


@register_term
class FeatureDistillation(LossTerm):
    """ILT: ``loss_de = --loss_de * MSE(body, body_old)`` on the backbone output, at steps > 0."""

    name = "ilt"
    order = 40
    needs_old_model = True
    needs_features = True

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--loss_de", type=nonnegative_float, default=0.0,
                            help="ILT feature distillation weight: MSE between new and old backbone outputs "
                                 "(ILT preset: 100)")

    def __init__(self, *, weight: float):
        self.weight = weight

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "FeatureDistillation | None":
        weight = getattr(cfg, "loss_de", 0.0)
        if weight <= 0 or ctx.model_old is None:
            return None
        return cls(weight=weight)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        return {"loss_de": self.weight * L.feature_distillation(batch.extras["body"], batch.extras_old["body"])}
