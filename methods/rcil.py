"""RCIL (Zhang et al., "Representation Compensation Networks for Continual Semantic Segmentation", CVPR 2022), from
its official code (zhangchbin/RCIL b9aad58) as docs/rcil.md describes.

* model (``model_spec``): the reference DeepLab-v3 with RCIL's twin branches (``modules/rcil.py``): every residual
  block's 3x3 conv + norm and the ASPP convs + norm have a twin, mixed by per-channel drop-path in training and
  averaged in evaluation.
* each step > 0 (``prepare_model``): every pair is folded into its main conv (frozen, norm made the identity) while
  the twin keeps training.
* losses (``terms``): MiB's unbiased CE and unbiased KD (``--loss_kd 100``, RCIL's preset) and Pooled Cube
  Knowledge Distillation on the four backbone stage outputs (after their LeakyReLU), the ASPP output and the small
  logits; PLOP's POD flags, which RCIL's scripts pass, have no effect there (dead code upstream) and none here
  (``ignored_flags``: a warning says so).
* new classifier (``init_new_classifier``): its weights copied from the background classifier, its bias left at the
  default initialisation (RCIL's ``init_balanced``; not MiB's bias correction).
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.tasks import is_domain_incremental
from methods.base import INIT_OWN, Batch, Capabilities, LossTerm, StepContext
from methods.criterion import build_terms
from methods.presets import TermMethod
from methods.registry import register_method
from models import BACKBONES
from modules.heads import final_layer
from modules.rcil import merge_twins
from utils.errors import UserError
from utils.loss import pckd_loss

log = logging.getLogger(__name__)

# RCIL's hard-coded PCKD weights per dataset: (spatial: backbone stages and ASPP, spatial: logits,
# channel: backbone stages, channel: ASPP). RCIL's "cityscape" (class-incremental Cityscapes) uses VOC's.
PCKD_WEIGHTS = {
    "voc": (0.01, 0.0005, 0.01, 0.0005),
    "cityscapes": (0.01, 0.0005, 0.01, 0.0005),
    "ade": (5e-6, 5e-7, 5e-6, 5e-7),
    "cityscapes_domain": (5e-4, 1e-4, 1e-4, 0.0),
}
TWIN_BLOCK = "twin"  # the residual block kind of modules/rcil.py
# What PCKD distils from the backbone: each stage's output *after* its last LeakyReLU (RCIL's last block returns the
# tensor it has just activated in place, zhangchbin/RCIL modules/residual.py L170-171), not the pre-activation maps
# that PLOP's POD reads (``stage_features``). Names of the In-Place ABN ResNets, the only backbones RCIL twins.
STAGE_OUTPUTS = ("res2", "res3", "res4", "res5")


def pckd_maps(extras: dict) -> list[Tensor]:
    """The maps PCKD compares: the four post-activation stage outputs, then the ASPP output."""
    return [extras["features"][name] for name in STAGE_OUTPUTS] + [extras["pre_logits"]]


# ------------------------------------------------------------------------------------------------ PCKD
class PCKD(LossTerm):
    """``loss_pckd`` at steps > 0."""

    name = "pckd"
    needs_old_model = True
    needs_features = True

    def __init__(self, *, n_old: int, n_classes: int, n_new: int, weights: Sequence[float]):
        self.n_old, self.n_classes, self.n_new, self.weights = n_old, n_classes, n_new, tuple(weights)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        loss = pckd_loss(pckd_maps(batch.extras_old), pckd_maps(batch.extras),
                         batch.extras_old["sem_logits_small"], batch.extras["sem_logits_small"], n_old=self.n_old,
                         n_classes=self.n_classes, n_new=self.n_new, weights=self.weights)
        return {"loss_pckd": loss}


# ------------------------------------------------------------------------------------------------ the method
@register_method
class RCIL(TermMethod):
    """RCIL: twin branches folded at every step, PCKD, MiB's UNCE/UNKD."""

    name = "RCIL"
    preset = {"loss_kd": 100, "unce": True, "unkd": True}
    description = "RCIL (CVPR 2022): representation compensation branches and pooled-cube distillation"
    capabilities = Capabilities(classifier_init=INIT_OWN)
    ignored_flags = {
        "pod": "PCKD replaces PLOP's POD, whose call is dead code in RCIL's own training loop; its scripts pass it",
        "pod_logits": "as --pod",
        "init_balanced": "RCIL always initialises the new classifier from the background weights; its scripts "
                         "pass the flag",
    }

    @classmethod
    def preset_for(cls, dataset: str | None) -> dict:
        """No UNCE/UNKD/KD when steps add domains: RCIL's cityscapes_domain scripts train its model with CE and
        PCKD only (``--method FT`` plus RCIL's model there); UNCE would have no loss with every class old."""
        return {} if dataset is not None and is_domain_incremental(dataset) else cls.preset

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--pckd_weights", type=float, nargs=4, default=None,
                           metavar=("SPATIAL", "SPATIAL_LOGITS", "CHANNEL", "CHANNEL_ASPP"),
                           help="RCIL: PCKD weights of the backbone stages and ASPP (spatial), of the logits "
                                "(spatial), of the backbone stages (channel) and of the ASPP output (channel); "
                                "default: RCIL's hard-coded values, VOC and Cityscapes 0.01 0.0005 0.01 0.0005, "
                                "ADE20K 5e-6 5e-7 5e-6 5e-7, cityscapes_domain 5e-4 1e-4 1e-4 0")

    @classmethod
    def check(cls, cfg: Any) -> None:
        weights = getattr(cfg, "pckd_weights", None)
        if weights is not None and any(not math.isfinite(w) or w < 0 for w in weights):
            raise UserError(f"--pckd_weights {weights}: the four weights must be finite and >= 0")

    def weights(self) -> tuple[float, ...]:
        if self.options.pckd_weights is not None:
            return tuple(self.options.pckd_weights)
        return PCKD_WEIGHTS.get(self.cfg.dataset, PCKD_WEIGHTS["voc"])

    # ---- model ---------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        if "block" not in BACKBONES.get_entry(spec.backbone, "--backbone").options:
            raise UserError(f"--method RCIL twins the residual blocks of a backbone; --backbone {spec.backbone} has "
                            "no block option (use the In-Place ABN layout ResNets resnet18/50/101)")
        return spec.with_backbone_options(block=TWIN_BLOCK).replace(head="twin_deeplabv3")

    def prepare_model(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            count = merge_twins(ctx.model)
            log.info("step %d: RCIL folded %d twin-branch modules into frozen convs; the twins keep training",
                     ctx.step, count)

    @torch.no_grad()
    def init_new_classifier(self, ctx: StepContext) -> bool:
        """New weights := the background weights (every new class); biases keep PyTorch's initialisation.

        With AWT (``--att``, ``--random_channels``) AWT's initialisation replaces this one (the stack's init plan
        does not call it), as it replaces MiB's ``--init_balanced`` in AWT's own code (docs/rcil.md)."""
        model = ctx.model
        new, bg = final_layer(model.cls[-1]), final_layer(model.cls[0])
        new.weight.copy_(bg.weight[0:1].expand_as(new.weight))
        log.info("step %d: new classifier weights copied from the background classifier (RCIL; biases keep "
                 "their initialisation)", ctx.step)
        return True

    # ---- losses ------------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list[LossTerm]:
        terms = [t for t in build_terms(self.cfg, ctx) if t.name != "pod"]
        if ctx.step > 0:
            terms.append(PCKD(n_old=ctx.n_old, n_classes=ctx.n_classes, n_new=ctx.n_new, weights=self.weights()))
        return terms
