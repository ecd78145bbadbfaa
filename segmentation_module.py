"""The incremental segmentation model: a backbone, a head and one classifier per step, assembled from registries.

Public API (see docs/architecture.md, "Model"):

* :class:`ModelSpec`: which backbone (``models.BACKBONES``), head (:data:`HEADS`) and per-step classifier
  (:data:`CLASSIFIERS`) make a model; methods adjust it (``Method.model_spec``).
* :func:`build_model_from_spec` / :func:`make_model` build the model and optionally load ImageNet weights into
  ``body``.
* :class:`IncrementalSegmentationModule` with ``forward``, ``init_new_classifier`` (reference table 3.4),
  ``fix_bn`` and parameter helpers.

The default family (``resnet*`` backbone, ``deeplabv3`` head, ``conv1x1`` classifiers) is the reference code's,
state-dict keys included.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import BACKBONES
from models.resnet import load_pretrained_body
from modules.aspp import ASPP
from modules.deeplab import DeeplabV3
from modules.dropclass import READOUTS, ROWS, DropClassPath
from modules.heads import conv_head_classifier, final_layer, linear_classifier
from modules.norm import NORM_ACT, is_norm_layer
from modules.rcil import TwinDeeplabV3
from utils.errors import UserError

__all__ = ["ModelSpec", "HEADS", "CLASSIFIERS", "HEAD_LAYOUTS", "build_model_from_spec", "make_model",
           "IncrementalSegmentationModule", "load_pretrained_body"]


class IncrementalSegmentationModule(nn.Module):
    """``body`` -> ``head`` -> ``pre_logits`` -> ``cls[i]`` for every head, concatenated along channels.

    ``classes``: the label space, classes per step (``classes[0]`` includes the background); what ``predict`` maps
    the logits to. ``heads``: the output channels of each classifier, by default one head per step (``classes``);
    SSUL's layout is ``[1 unknown, 1 background, classes[0] - 1, classes[1], ...]`` (``HEAD_LAYOUTS``).
    ``drop``: DropClass's drop path (``modules/dropclass.py``) between ``pre_logits`` and the classifiers, or None."""

    def __init__(self, body: nn.Module, head: nn.Module, head_channels: int, classes: Sequence[int],
                 output_stride: int = 16, classifier: Callable[[int, int], nn.Module] = linear_classifier,
                 heads: Sequence[int] | None = None, drop: nn.Module | None = None):
        super().__init__()
        classes = [int(c) for c in classes]
        heads = classes if heads is None else [int(h) for h in heads]
        if not classes or any(c <= 0 for c in classes) or any(h <= 0 for h in heads):
            raise ValueError(f"classes and heads must be non-empty lists of positive counts, got {classes}, {heads}")
        if sum(heads) < sum(classes):
            raise ValueError(f"heads {heads} have fewer channels than the classes {classes}")
        self.body = body
        self.head = head
        self.head_channels = int(head_channels)
        self.classes = classes
        self.heads = heads
        self.output_stride = output_stride
        self.cls = nn.ModuleList([classifier(self.head_channels, h) for h in heads])
        self.drop = drop
        self._bn_fixed = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ret_intermediate: bool = False, keep: torch.Tensor | None = None):
        """``(logits (B, C, H, W), extras)``. With a drop path: in training the logits are the plain path's and
        ``extras["drop_logits"]`` / ``["drop_logits_small"]`` the drop path's with the classes of ``keep`` (bool
        (C,), default all); in evaluation the logits are those of ``drop.readout``."""
        body_out, attentions = self.body(x)
        pre_logits = self.head(body_out)
        sem_logits_small = self._classify(pre_logits)
        extras = {"pre_logits": pre_logits}
        if self.drop is not None:
            if self.training and self.drop.train_drop:
                drop_small = self._classify(self.drop(pre_logits, self.classifier_rows(), keep))
                extras["drop_logits_small"] = drop_small
                extras["drop_logits"] = F.interpolate(drop_small, size=x.shape[-2:], mode="bilinear",
                                                      align_corners=False)
            elif not self.training and self.drop.readout == "drop":
                sem_logits_small = self._classify(self.drop(pre_logits, self.classifier_rows(), keep))
        logits = F.interpolate(sem_logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if ret_intermediate:
            extras["body"] = body_out
            extras["attentions"] = list(attentions) + [pre_logits]
            extras["sem_logits_small"] = sem_logits_small
        return logits, extras

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(features) for c in self.cls], dim=1)

    def classifier_rows(self) -> torch.Tensor:
        """The weights of every class's 1x1 classifier as rows (C, head_channels), classes in output order."""
        return torch.cat([final_layer(c).weight.flatten(1) for c in self.cls], dim=0)

    # ------------------------------------------------------------------ classifier init (reference table 3.4)
    @torch.no_grad()
    def init_new_classifier(self, *, channel_mask: torch.Tensor | None = None, orig_init: bool = False,
                            copy: bool = False, copy_bias: bool = False,
                            source: tuple[nn.Conv2d, int] | None = None) -> None:
        """Initialise ``cls[-1]`` from the background classifier ``w_bg = cls[0].weight[0]``, ``b_bg = cls[0].bias[0]``
        (``source = (layer, row)``: from that row of another 1x1 layer instead, e.g. SSUL's unknown classifier).

        Same order of operations as the reference, so every flag combination gives the reference result
        (``b* = b_bg - log(N_new + 1)``, computed once from the original ``b_bg``):

        1. ``orig_init``: every new weight := ``w_bg``.
        2. mask given and not ``copy``: ``W_new += w_bg * mask`` (bool ``[C]`` / ``[N_new, C]`` mask or float ``[C]``
           random-channel mask); with ``copy_bias`` also ``b_new := b*``, ``b_bg := b*``.
           ``copy``: ``W_new := where(mask, w_bg, W_new)`` (needs a bool mask; ValueError otherwise).
        3. ``orig_init``: ``b_new := b*``, ``b_bg := b*``.
        """
        if len(self.cls) < 2:
            raise ValueError("init_new_classifier needs a model with at least two classifiers (step > 0)")
        new_cls = final_layer(self.cls[-1])
        bg_cls, row = source if source is not None else (final_layer(self.cls[0]), 0)
        n_new = self.classes[-1]
        w_bg = bg_cls.weight[row].detach().clone().unsqueeze(0)  # (1, C, 1, 1)
        b_star = bg_cls.bias[row].detach().clone() - math.log(n_new + 1)
        mask = self._normalise_mask(channel_mask, n_new) if channel_mask is not None else None
        if copy and (mask is None or mask.dtype != torch.bool):
            kind = "no mask" if mask is None else f"a {mask.dtype} mask"
            raise ValueError(f"init_new_classifier(copy=True) needs a boolean channel mask, got {kind}; "
                             "use copy only with an AWT attribution mask (not --random_channels or --no_att)")

        def set_biases() -> None:
            new_cls.bias.fill_(float(b_star))
            bg_cls.bias[row] = b_star

        if orig_init:
            new_cls.weight.copy_(w_bg.expand_as(new_cls.weight))
        if mask is not None and not copy:
            new_cls.weight.add_(w_bg * mask.to(w_bg.dtype))
            if copy_bias:
                set_biases()
        elif copy:
            new_cls.weight.copy_(torch.where(mask, w_bg, new_cls.weight))
        if orig_init:
            set_biases()

    def _normalise_mask(self, mask: torch.Tensor, n_new: int) -> torch.Tensor:
        """Return the mask as ``(1 | N_new, C, 1, 1)`` on the classifier's device."""
        if not torch.is_tensor(mask):
            raise ValueError(f"channel_mask must be a tensor, got {type(mask).__name__}")
        c = self.head_channels
        m = mask.detach().to(final_layer(self.cls[-1]).weight.device)
        if m.dim() == 4 and m.shape[2:] == (1, 1):
            m = m[:, :, 0, 0]
        elif m.dim() == 3 and m.shape[1:] == (1, 1):
            m = m[:, 0, 0]
        if m.dim() == 1:
            m = m.unsqueeze(0)
        if m.dim() != 2 or m.shape[1] != c or m.shape[0] not in (1, n_new):
            raise ValueError(f"channel_mask of shape {tuple(mask.shape)} does not fit {n_new} new classes x {c} "
                             f"channels; expected [{c}], [{c},1,1], [{n_new},{c}] or [{n_new},{c},1,1]")
        if m.dtype != torch.bool and not m.is_floating_point():
            m = m != 0  # integer 0/1 masks mean the same as boolean ones
        return m[:, :, None, None]

    # ------------------------------------------------------------------ BN freezing
    def fix_bn(self) -> None:
        """Norm layers to eval mode and their affine parameters frozen; survives later ``train()`` calls."""
        self._bn_fixed = True
        for m in self.norm_layers():
            m.eval()
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)

    @property
    def bn_fixed(self) -> bool:
        return self._bn_fixed

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._bn_fixed:
            for m in self.norm_layers():
                m.eval()
        return self

    def norm_layers(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if is_norm_layer(m))

    # ------------------------------------------------------------------ parameter groups
    def body_params(self) -> Iterator[nn.Parameter]:
        return iter(self.body.parameters())

    def head_params(self) -> Iterator[nn.Parameter]:
        return iter(self.head.parameters())

    def classifier_params(self) -> Iterator[nn.Parameter]:
        return iter(self.cls.parameters())

    def old_classifier_params(self) -> Iterator[nn.Parameter]:
        """Parameters of ``cls[:-1]`` (classifiers of previous steps; empty at step 0)."""
        return (p for c in list(self.cls)[:-1] for p in c.parameters())

    def new_classifier_params(self) -> Iterator[nn.Parameter]:
        """Parameters of ``cls[-1]`` (the classifier of the current step)."""
        return iter(self.cls[-1].parameters())


@dataclass(frozen=True)
class ModelSpec:
    """What a model is made of; the step's classes are given separately."""

    backbone: str = "resnet101"  # a key of models.BACKBONES
    norm_act: str = "iabn_sync"  # a key of modules.norm.NORM_ACT (backbones and heads of the reference layout)
    output_stride: int = 16
    head: str = "deeplabv3"  # a key of HEADS
    classifier: str = "conv1x1"  # a key of CLASSIFIERS
    pooling: int | None = 32  # image-pooling window of the reference head in evaluation
    head_layout: str = "per_step"  # a key of HEAD_LAYOUTS: output channels of each classifier
    head_channels: int = 256
    backbone_bn_momentum: float | None = None  # None: the family's default
    dropclass: str = ""  # "" none; DropClass's drop path answering in evaluation with "drop" or "plain"
    dropclass_rows: str = "frozen"  # importance rows of earlier steps' classes: "frozen" or "live"

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


def _deeplabv3(spec: ModelSpec, in_channels: int) -> nn.Module:
    return DeeplabV3(in_channels, spec.head_channels, spec.head_channels, out_stride=spec.output_stride,
                     norm_act=NORM_ACT[spec.norm_act], pooling_size=spec.pooling)


def _aspp(spec: ModelSpec, in_channels: int) -> nn.Module:
    return ASPP(in_channels, spec.head_channels, spec.output_stride)


def _twin_deeplabv3(spec: ModelSpec, in_channels: int) -> nn.Module:
    return TwinDeeplabV3(in_channels, spec.head_channels, spec.head_channels, out_stride=spec.output_stride,
                         norm_act=NORM_ACT[spec.norm_act], pooling_size=spec.pooling)


# head name -> (spec, backbone channels) -> module mapping backbone features to head_channels
HEADS: dict[str, Callable[[ModelSpec, int], nn.Module]] = {
    "deeplabv3": _deeplabv3,  # reference layout: ASPP summed with image pooling, norm layers from --norm_act
    "aspp": _aspp,  # torchvision / SSUL layout: Conv-BN-ReLU branches, 1x1 projection, dropout
    "twin_deeplabv3": _twin_deeplabv3,  # RCIL: the reference head with twin ASPP convs
}
# classifier name -> (head_channels, classes of a step) -> module
CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "conv1x1": linear_classifier,  # one 1x1 conv per step (reference)
    "conv_head": conv_head_classifier,  # 3x3 conv-BN-ReLU-1x1 per step (SSUL)
}


# head layout name -> classes per step -> output channels of each classifier
HEAD_LAYOUTS: dict[str, Callable[[Sequence[int]], list[int]]] = {
    "per_step": lambda classes: list(classes),  # one classifier per step, background in the first (reference)
    # SSUL: unknown and background on heads of their own in front of the step-0 foreground classes
    "unknown_first": lambda classes: [1, 1, classes[0] - 1, *classes[1:]],
}


def _check_spec(spec: ModelSpec) -> None:
    for what, value, table in (("--backbone", spec.backbone, BACKBONES), ("--norm_act", spec.norm_act, NORM_ACT),
                               ("head", spec.head, HEADS), ("classifier", spec.classifier, CLASSIFIERS),
                               ("head layout", spec.head_layout, HEAD_LAYOUTS)):
        if value not in table:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(sorted(table))}")
    if spec.dropclass not in ("", *READOUTS) or spec.dropclass_rows not in ROWS:
        raise UserError(f"unknown DropClass readout {spec.dropclass!r} or rows {spec.dropclass_rows!r}")
    if spec.output_stride not in (8, 16):
        raise UserError(f"--output_stride must be 8 or 16, got {spec.output_stride}")


def build_model_from_spec(spec: ModelSpec, classes: Sequence[int],
                          pretrained_path: str | None = None) -> IncrementalSegmentationModule:
    """Backbone (+ ImageNet weights from ``pretrained_path``), head, one classifier per step of ``classes``."""
    _check_spec(spec)
    family = BACKBONES[spec.backbone]
    body = family.build(spec.norm_act, spec.output_stride, spec.backbone_bn_momentum)
    if pretrained_path is not None:
        family.load_pretrained(body, pretrained_path)
    head = HEADS[spec.head](spec, body.out_channels)
    drop = None
    if spec.dropclass:
        n_frozen = sum(classes[:-1]) if spec.dropclass_rows == "frozen" else 0
        drop = DropClassPath(spec.head_channels, NORM_ACT[spec.norm_act], n_frozen=n_frozen, readout=spec.dropclass)
    return IncrementalSegmentationModule(body, head, spec.head_channels, classes, spec.output_stride,
                                         classifier=CLASSIFIERS[spec.classifier],
                                         heads=HEAD_LAYOUTS[spec.head_layout](list(classes)), drop=drop)


def make_model(*, backbone: str, norm_act: str, output_stride: int, classes: Sequence[int],
               pooling: int | None = 32, pretrained_path: str | None = None, head_channels: int = 256,
               head: str = "deeplabv3", classifier: str = "conv1x1") -> IncrementalSegmentationModule:
    """:func:`build_model_from_spec` with the spec given as keywords; see docs/architecture.md."""
    spec = ModelSpec(backbone=backbone, norm_act=norm_act, output_stride=output_stride, head=head,
                     classifier=classifier, pooling=pooling, head_channels=head_channels)
    return build_model_from_spec(spec, classes, pretrained_path)
