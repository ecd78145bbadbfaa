"""RCIL (Zhang et al., "Representation Compensation Networks for Continual Semantic Segmentation", CVPR 2022), from
its official code (zhangchbin/RCIL b9aad58) as docs/rcil.md describes.

* model (``model_spec``): the reference DeepLab-v3 with RCIL's twin branches (``modules/rcil.py``): every residual
  block's 3x3 conv + norm and the ASPP convs + norm have a twin, mixed by per-channel drop-path in training and
  averaged in evaluation.
* each step > 0 (``prepare_model``): every pair is folded into its main conv (frozen, norm made the identity) while
  the twin keeps training.
* losses (``terms``): MiB's unbiased CE and unbiased KD (``--loss_kd 100``, RCIL's preset) and Pooled Cube
  Knowledge Distillation on the four backbone stages, the ASPP output and the small logits; PLOP's POD flags, which
  RCIL's scripts pass, have no effect there (dead code upstream) and none here (a warning says so).
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
from methods.awt import classifier_init_plan
from methods.base import Batch, LossTerm, StepContext
from methods.criterion import build_terms
from methods.presets import TermMethod
from methods.registry import register_method
from modules.heads import final_layer
from modules.rcil import merge_twins
from utils.errors import UserError

log = logging.getLogger(__name__)

SPATIAL_KERNELS = (4, 8, 12, 16, 20, 24)
# RCIL's hard-coded PCKD weights per dataset: (spatial: backbone stages and ASPP, spatial: logits,
# channel: backbone stages, channel: ASPP). RCIL's "cityscape" (class-incremental Cityscapes) uses VOC's.
PCKD_WEIGHTS = {
    "voc": (0.01, 0.0005, 0.01, 0.0005),
    "cityscapes": (0.01, 0.0005, 0.01, 0.0005),
    "ade": (5e-6, 5e-7, 5e-6, 5e-7),
    "cityscapes_domain": (5e-4, 1e-4, 1e-4, 0.0),
}
_POD_FLAGS = (("pod", None), ("pod_logits", False))


# ------------------------------------------------------------------------------------------------ PCKD
def collapse_new_classes(new_logits: Tensor, n_old: int) -> Tensor:
    """The new model's logits in the old label space: background + every new class summed (logits, not
    probabilities, as RCIL), old classes kept."""
    return torch.cat([new_logits[:, :1] + new_logits[:, n_old:].sum(dim=1, keepdim=True),
                      new_logits[:, 1:n_old]], dim=1)


def _distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over images of the L2 norm of the flattened per-image difference."""
    return (a - b).flatten(1).norm(dim=1).mean()


def spatial_term(old: Tensor, new: Tensor) -> Tensor:
    """Mean over the six window sizes of the distance between stride-1 average pools of the squared maps."""
    a, b = old.float() ** 2, new.float() ** 2
    return sum(_distance(F.avg_pool2d(a, k, stride=1, padding=k // 2), F.avg_pool2d(b, k, stride=1, padding=k // 2))
               for k in SPATIAL_KERNELS) / len(SPATIAL_KERNELS)


def channel_term(old: Tensor, new: Tensor) -> Tensor:
    """Distance between the squared maps averaged over three neighbouring channels (zero-padded, stride 1)."""
    a, b = old.float() ** 2, new.float() ** 2

    def pool(x):
        return F.avg_pool2d(x.permute(0, 2, 1, 3), (3, 1), stride=1, padding=(1, 0)).permute(0, 2, 1, 3)
    return _distance(pool(a), pool(b))


def pckd_loss(old_maps: Sequence[Tensor], new_maps: Sequence[Tensor], old_logits: Tensor, new_logits: Tensor, *,
              n_old: int, n_classes: int, n_new: int, weights: Sequence[float]) -> Tensor:
    """RCIL's L_PCKD. ``*_maps``: the four backbone stages and the ASPP output; ``*_logits``: the logits before
    upsampling. ``weights``: see :data:`PCKD_WEIGHTS`; the class ratio ``sqrt(n_classes / n_new)`` scales both."""
    w_spa, w_spa_last, w_ch, w_ch_last = weights
    scale = math.sqrt(n_classes / n_new)
    if new_logits.shape[1] != old_logits.shape[1]:  # domain-incremental steps keep the classes
        new_logits = collapse_new_classes(new_logits, n_old)
    spatial_pairs = list(zip(old_maps, new_maps)) + [(old_logits, new_logits)]
    spatial = sum(spatial_term(a, b) * scale * (w_spa_last if i == len(spatial_pairs) - 1 else w_spa)
                  for i, (a, b) in enumerate(spatial_pairs)) / len(spatial_pairs)
    channel = sum(channel_term(a, b) * scale * (w_ch_last if i == len(old_maps) - 1 else w_ch)
                  for i, (a, b) in enumerate(zip(old_maps, new_maps))) / len(old_maps)
    return spatial + channel


class PCKD(LossTerm):
    """``loss_pckd`` at steps > 0."""

    name = "pckd"
    needs_old_model = True
    needs_features = True

    def __init__(self, *, n_old: int, n_classes: int, n_new: int, weights: Sequence[float]):
        self.n_old, self.n_classes, self.n_new, self.weights = n_old, n_classes, n_new, tuple(weights)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        loss = pckd_loss(batch.extras_old["attentions"], batch.extras["attentions"],
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
    own_classifier_init = True  # --init_balanced means RCIL's weight-only initialisation with --method RCIL

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
        if getattr(cfg, "orig_init", False):
            raise UserError("--orig_init (MiB's initialisation) does not combine with --method RCIL, which "
                            "initialises the new classifier from the background weights itself; remove it")
        weights = getattr(cfg, "pckd_weights", None)
        if weights is not None and any(not math.isfinite(w) or w < 0 for w in weights):
            raise UserError(f"--pckd_weights {weights}: the four weights must be finite and >= 0")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if any(getattr(cfg, dest, default) != default for dest, default in _POD_FLAGS):
            log.warning("--pod/--pod_logits have no effect with --method RCIL: PCKD replaces PLOP's POD, whose call "
                        "is dead code in RCIL's own training loop (its scripts pass the flags all the same)")

    def weights(self) -> tuple[float, ...]:
        if self.cfg.pckd_weights is not None:
            return tuple(self.cfg.pckd_weights)
        return PCKD_WEIGHTS.get(self.cfg.dataset, PCKD_WEIGHTS["voc"])

    # ---- model ---------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        if spec.backbone.startswith("tv_"):
            raise UserError("--method RCIL builds on the In-Place ABN layout ResNets (resnet18/50/101), not "
                            f"--backbone {spec.backbone}")
        return spec.replace(backbone="rcil_" + spec.backbone, head="twin_deeplabv3")

    def prepare_model(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            count = merge_twins(ctx.model)
            log.info("step %d: RCIL folded %d twin-branch modules into frozen convs; the twins keep training",
                     ctx.step, count)

    @torch.no_grad()
    def init_new_classifier(self, ctx: StepContext) -> bool:
        """New weights := the background weights (every new class); biases keep PyTorch's initialisation.

        With AWT (``--att``, ``--random_channels``) AWT's initialisation replaces this one, as it replaces MiB's
        ``--init_balanced`` in AWT's own code (docs/rcil.md)."""
        if classifier_init_plan(self.cfg) is not None:
            return False
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
