"""Classification terms: CE, MiB unbiased CE, BCE, focal, iCaRL / LwF-MC (behaviour.md 2.1-2.3)."""
from __future__ import annotations

import argparse
from typing import Any

from torch import Tensor

from methods.registry import register_term
from methods.base import Batch, LossTerm, StepContext, pixel_mean
from utils import loss as L
from utils.flags import CLASS_INCREMENTAL, NOT_IMPLEMENTED, declare, nonnegative_float
from utils.constants import IGNORE_INDEX
from utils.errors import UserError


@register_term
class Classification(LossTerm):
    """Per-pixel classification loss ``loss_ce`` (+ ``loss_icarl`` for LwF-MC "combined").

    Criterion choice follows the reference order: ``--bce``/``--icarl`` -> BCE with ignore; else ``--unce`` with old
    classes -> MiB unbiased CE (plain CE at step 0); else ``--focal_loss`` -> focal; ``--focal_loss_new`` -> focal on
    new-class pixels; else CE. The per-pixel loss is multiplied by ``batch.pixel_weight`` and averaged over all pixels.
    """

    name = "classification"
    order = 20
    unsupported = (
        ("nca", False, "NCA loss with a cosine classifier"),
        ("nca_margin", 0.0, "NCA margin"),
        ("cosine", False, "cosine classifier"),
        ("ce_on_new", False, "CE restricted to new classes"),
        ("sample_weights_new", None, "per-pixel weight for new classes (applied to every pixel in the reference)"),
    )

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--bce", action="store_true", default=False,
                            help="binary cross-entropy (one-hot, sum over classes) instead of softmax CE")
        declare(parser.add_argument("--unce", action="store_true", default=False,
                            help="MiB unbiased cross-entropy at steps > 0 (old classes folded into background)"),
                requires=CLASS_INCREMENTAL)
        declare(parser.add_argument("--icarl", action="store_true", default=False,
                            help="LwF-MC / iCaRL: BCE criterion plus BCE distillation on the old classes"),
                requires=CLASS_INCREMENTAL)
        parser.add_argument("--icarl_importance", type=nonnegative_float, default=1.0,
                            help="weight of the iCaRL distillation term (LWF-MC preset: 10)")
        parser.add_argument("--icarl_disjoint", action="store_true", default=False,
                            help="iCaRL 'disjoint' variant: old-class BCE targets := sigmoid(old logits), no separate "
                                 "distillation term (default: 'combined')")
        parser.add_argument("--icarl_bkg", action="store_true", default=False,
                            help="with --icarl_disjoint keep the one-hot background target")
        parser.add_argument("--focal_loss", action="store_true", default=False,
                            help="focal loss alpha*(1-p_y)^gamma*CE (alpha = --alpha)")
        parser.add_argument("--focal_loss_new", action="store_true", default=False,
                            help="focal loss on pixels of new classes only, CE elsewhere")
        parser.add_argument("--focal_loss_gamma", type=int, default=2, help="focal loss exponent gamma")
        parser.add_argument("--nca", action="store_true", default=False, help=NOT_IMPLEMENTED + "NCA loss")
        parser.add_argument("--nca_margin", type=float, default=0.0, help=NOT_IMPLEMENTED + "NCA margin")
        parser.add_argument("--cosine", action="store_true", default=False, help=NOT_IMPLEMENTED + "cosine classifier")
        parser.add_argument("--ce_on_new", action="store_true", default=False, help=NOT_IMPLEMENTED + "CE on new classes only")
        parser.add_argument("--sample_weights_new", type=float, default=None,
                            help=NOT_IMPLEMENTED + "per-pixel loss weight of new classes")

    def __init__(self, *, kind: str, n_old: int, icarl: str | None, icarl_importance: float, icarl_bkg: bool,
                 alpha: float, gamma: float, ce_on_pseudo: bool, pseudo_soft: str | None = None,
                 pseudo_soft_factor: float = 1.0):
        self.kind = kind  # "ce" | "unce" | "bce" | "focal" | "focal_new"
        self.n_old = n_old
        self.icarl = icarl  # None | "combined" | "disjoint"  (only at steps > 0)
        self.icarl_importance = icarl_importance
        self.icarl_bkg = icarl_bkg
        self.alpha = alpha
        self.gamma = gamma
        self.ce_on_pseudo = ce_on_pseudo
        self.pseudo_soft = pseudo_soft  # None | "soft_certain" | "soft_uncertain" (PLOP ablation)
        self.pseudo_soft_factor = pseudo_soft_factor
        self.needs_old_model = icarl is not None

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "Classification":
        n_old = ctx.n_old if ctx.model_old is not None else 0
        icarl = getattr(cfg, "icarl", False)
        if getattr(cfg, "bce", False) or icarl:
            kind = "bce"
        elif getattr(cfg, "unce", False) and n_old > 0:
            kind = "unce"
        elif getattr(cfg, "focal_loss", False):
            kind = "focal"
        elif getattr(cfg, "focal_loss_new", False):
            kind = "focal_new"
        else:
            kind = "ce"
        icarl_mode = None
        if icarl and n_old > 0:
            icarl_mode = "disjoint" if getattr(cfg, "icarl_disjoint", False) else "combined"
        return cls(kind=kind, n_old=n_old, icarl=icarl_mode, icarl_importance=getattr(cfg, "icarl_importance", 1.0),
                   icarl_bkg=getattr(cfg, "icarl_bkg", False), alpha=getattr(cfg, "alpha", 1.0),
                   gamma=getattr(cfg, "focal_loss_gamma", 2), ce_on_pseudo=getattr(cfg, "ce_on_pseudo", False),
                   pseudo_soft=getattr(cfg, "pseudo_soft", None) if n_old > 0 else None,
                   pseudo_soft_factor=getattr(cfg, "pseudo_soft_factor", 1.0))

    def per_pixel(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The selected criterion, (B, C, H, W), (B, H, W) -> (B, H, W)."""
        if self.kind == "bce":
            return L.bce_with_ignore(logits, labels)
        if self.kind == "unce":
            return L.unbiased_cross_entropy(logits, labels, self.n_old)
        if self.kind == "focal":
            return L.focal_loss(logits, labels, self.alpha, self.gamma)
        if self.kind == "focal_new":
            return L.focal_loss_new(logits, labels, self.n_old, self.alpha, self.gamma)
        return L.cross_entropy(logits, labels)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        if self.icarl == "disjoint":
            loss = L.icarl_disjoint(batch.logits, batch.labels, batch.logits_old, bkg=self.icarl_bkg)
            return {"loss_ce": pixel_mean(loss, batch.pixel_weight)}
        if self.pseudo_soft and batch.pseudo_mask is not None:
            loss = self._soft(batch)
        elif self.ce_on_pseudo and batch.pseudo_mask is not None:
            loss = self._ce_on_pseudo(batch)
        else:
            loss = self.per_pixel(batch.logits, batch.labels)
        out = {"loss_ce": pixel_mean(loss, batch.pixel_weight)}
        if self.icarl == "combined":
            n_old = batch.logits_old.shape[1]
            out["loss_icarl"] = self.icarl_importance * n_old * L.icarl_distillation(batch.logits, batch.logits_old)
        return out

    def _soft(self, batch: Batch) -> Tensor:
        """``--pseudo_soft``: hard labels on certain pixels, the old model's distribution elsewhere. soft_certain:
        only non-background pixels are certain; soft_uncertain: confidently pseudo-labelled background pixels too."""
        not_background = batch.original_labels >= self.n_old  # new classes and 255
        certain = not_background if self.pseudo_soft == "soft_certain" else not_background | batch.pseudo_mask
        return L.soft_cross_entropy(batch.logits, batch.labels, batch.logits_old, certain, self.pseudo_soft_factor)

    def _ce_on_pseudo(self, batch: Batch) -> Tensor:
        """``--ce_on_pseudo``: the selected criterion on the original labels of non-pseudo-labelled pixels + plain CE
        on the pseudo-labelled pixels."""
        mask = batch.pseudo_mask
        not_pseudo = batch.original_labels.masked_fill(mask, IGNORE_INDEX)
        pseudo = batch.labels.masked_fill(~mask, IGNORE_INDEX)
        return self.per_pixel(batch.logits, not_pseudo) + L.cross_entropy(batch.logits, pseudo)

    @classmethod
    def check(cls, cfg: Any) -> None:
        if getattr(cfg, "icarl_bkg", False) and not getattr(cfg, "icarl_disjoint", False):
            raise UserError("--icarl_bkg only applies to --icarl_disjoint; add --icarl --icarl_disjoint or remove it")
        if getattr(cfg, "focal_loss", False) and getattr(cfg, "focal_loss_new", False):
            raise UserError("--focal_loss and --focal_loss_new are exclusive; keep one of them")

