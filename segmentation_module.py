"""The incremental segmentation model: ResNet body + DeepLab-v3 head + one 1x1 classifier per step.

Public API (see docs/architecture.md, "Model"):

* :func:`make_model` builds the model and optionally loads the In-Place ABN ImageNet weights into ``body``.
* :class:`IncrementalSegmentationModule` with ``forward``, ``init_new_classifier`` (reference table 3.4),
  ``fix_bn`` and parameter helpers.
* :func:`load_pretrained_body` loads a backbone checkpoint in the In-Place ABN layout strictly.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.norm import NORM_ACT, is_norm_layer
from models.resnet import STRUCTURES, build_backbone
from modules.deeplab import DeeplabV3
from utils.errors import UserError

__all__ = ["make_model", "IncrementalSegmentationModule", "load_pretrained_body"]


class IncrementalSegmentationModule(nn.Module):
    """``body`` -> ``head`` -> ``pre_logits`` -> ``cls[i]`` for every step, concatenated along channels."""

    def __init__(self, body: nn.Module, head: nn.Module, head_channels: int, classes: Sequence[int],
                 output_stride: int = 16):
        super().__init__()
        classes = [int(c) for c in classes]
        if not classes or any(c <= 0 for c in classes):
            raise ValueError(f"classes must be a non-empty list of positive counts, got {classes}")
        self.body = body
        self.head = head
        self.head_channels = int(head_channels)
        self.classes = classes
        self.output_stride = output_stride
        self.cls = nn.ModuleList([nn.Conv2d(self.head_channels, c, 1, bias=True) for c in classes])
        self._bn_fixed = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ret_intermediate: bool = False):
        body_out, attentions = self.body(x)
        pre_logits = self.head(body_out)
        sem_logits_small = torch.cat([c(pre_logits) for c in self.cls], dim=1)
        logits = F.interpolate(sem_logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        extras = {"pre_logits": pre_logits}
        if ret_intermediate:
            extras["body"] = body_out
            extras["attentions"] = list(attentions) + [pre_logits]
            extras["sem_logits_small"] = sem_logits_small
        return logits, extras

    # ------------------------------------------------------------------ classifier init (reference table 3.4)
    @torch.no_grad()
    def init_new_classifier(self, *, channel_mask: torch.Tensor | None = None, orig_init: bool = False,
                            copy: bool = False, copy_bias: bool = False) -> None:
        """Initialise ``cls[-1]`` from the background classifier ``w_bg = cls[0].weight[0]``, ``b_bg = cls[0].bias[0]``.

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
        new_cls, bg_cls = self.cls[-1], self.cls[0]
        n_new = self.classes[-1]
        w_bg = bg_cls.weight[0].detach().clone().unsqueeze(0)  # (1, C, 1, 1)
        b_star = bg_cls.bias[0].detach().clone() - math.log(n_new + 1)
        mask = self._normalise_mask(channel_mask, n_new) if channel_mask is not None else None
        if copy and (mask is None or mask.dtype != torch.bool):
            kind = "no mask" if mask is None else f"a {mask.dtype} mask"
            raise ValueError(f"init_new_classifier(copy=True) needs a boolean channel mask, got {kind}; "
                             "use copy only with an AWT attribution mask (not --random_channels or --no_att)")

        def set_biases() -> None:
            new_cls.bias.fill_(float(b_star))
            bg_cls.bias[0] = b_star

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
        m = mask.detach().to(self.cls[-1].weight.device)
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


def load_pretrained_body(body: nn.Module, path: str) -> None:
    """Load an ImageNet backbone file in the In-Place ABN layout strictly into ``body``.

    Accepts ``{"state_dict": {...}}`` or a bare state dict, keys with or without ``module.``; drops
    ``classifier.*`` (the ImageNet fc); adds ``num_batches_tracked`` where ``body`` has them (``std`` norm).
    """
    hint = "download it (see pretrained/README.md) or pass --no_pretrained"
    if not os.path.isfile(path):
        raise UserError(f"pretrained backbone weights not found: {path}; {hint}")
    from utils.checkpoint import safe_load, strip_module_prefix  # weights_only loading with an allow-list

    try:
        obj = safe_load(path, "pretrained backbone weights")
    except UserError as exc:
        raise UserError(f"{exc}; {hint}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"pretrained backbone weights {path} are not a state dict of tensors; {hint}")
    state = strip_module_prefix(dict(state))
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    own = body.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"{name} {len(keys)}: {show(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)) if keys]
        raise UserError(f"pretrained backbone weights {path} do not match the backbone ({'; '.join(parts)}); "
                        f"check --backbone, or {hint}")
    body.load_state_dict(state, strict=True)


def make_model(*, backbone: str, norm_act: str, output_stride: int, classes: Sequence[int],
               pooling: int | None = 32, pretrained_path: str | None = None,
               head_channels: int = 256) -> IncrementalSegmentationModule:
    """Build ResNet body + DeepLab-v3 head + per-step classifiers; see docs/architecture.md."""
    if backbone not in STRUCTURES:
        raise UserError(f"unknown --backbone {backbone!r}; choose one of {', '.join(sorted(STRUCTURES))}")
    if norm_act not in NORM_ACT:
        raise UserError(f"unknown --norm_act {norm_act!r}; choose one of {', '.join(NORM_ACT)}")
    if output_stride not in (8, 16):
        raise UserError(f"--output_stride must be 8 or 16, got {output_stride}")
    norm = NORM_ACT[norm_act]
    body = build_backbone(backbone, norm, output_stride)
    if pretrained_path is not None:
        load_pretrained_body(body, pretrained_path)
    head = DeeplabV3(body.out_channels, head_channels, head_channels, out_stride=output_stride, norm_act=norm,
                     pooling_size=pooling)
    return IncrementalSegmentationModule(body, head, head_channels, classes, output_stride)
