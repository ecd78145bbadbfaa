"""PLOP's Pooled Outputs Distillation (behaviour.md 2.4): local / spatial / global POD of intermediate features.

``pod_embed`` turns one (B, C, H, W) map into a (B, D) vector; ``pod_loss`` compares old and new embeddings of every
map: ``factor * ||e_old - e_new||_2`` averaged over the batch, times ``sqrt(C / C_new)`` (POD schedule), summed over
maps and divided by the number of maps.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.registry import register_term
from methods.base import Batch, LossTerm, StepContext
from utils.constants import BACKGROUND
from utils.errors import UserError
from utils.flags import NOT_IMPLEMENTED, nonnegative_float
from utils.loss import collapse_new_classes, pod_embed, upcast
from utils.loss import pod_preprocess as preprocess

SPP_SCALES = (1, 2, 4)  # PLOP default --spp_scales
COLLAPSES = ("local", "spatial", "global")
PREPROS = ("pow", "abs", "relu", "none")
EXTRA_CHANNELS = ("sum", "trim")
# Keys accepted in --pod_options "switch" -> "before"/"after" (reference names) -> PODLayer field.
_SWITCH_KEYS = {"type": "collapse", "factor": "factor", "prepro": "prepro", "spp_scales": "spp_scales",
                "extra_channels": "extra_channels", "use_adaptative_factor": "adaptive"}
_SWITCH_DEFAULT_ONLY = {"norm": False, "normalize_spm": False, "pool": True}  # accepted only at these values


@dataclass(frozen=True)
class PODLayer:
    """How one feature map is distilled."""

    collapse: str = "local"  # local | spatial | global
    factor: float = 0.01  # --pod_factor
    prepro: str = "pow"  # pow (square) | abs | relu | none
    spp_scales: tuple[int, ...] = SPP_SCALES
    extra_channels: str = "sum"  # how extra (new-class) logit channels are folded: sum into background | trim
    adaptive: bool = False  # multiply by the fraction of background pixels in the batch


@dataclass(frozen=True)
class PODConfig:
    """POD for all maps: ``inner`` for every map but the last, ``last`` for the last one ("switch.after")."""

    inner: PODLayer = field(default_factory=PODLayer)
    last: PODLayer = field(default_factory=PODLayer)
    schedule: bool = True  # multiply by sqrt(C / C_new) unless --no_pod_schedule
    logits: bool = False  # --pod_logits: append the pre-upsampling logits as the last map


def parse_pod_config(*, collapse: str, factor: float, prepro: str, spp_scales: Any, options: dict | None,
                     schedule: bool, logits: bool) -> PODConfig:
    """Translate the reference flags (+ the ``--pod_options`` JSON) into a ``PODConfig``; UserError when invalid."""
    base = PODLayer(collapse=collapse, factor=float(factor), prepro=prepro, spp_scales=tuple(spp_scales))
    _validate(base, "--pod/--pod_prepro")
    options = dict(options or {})
    switch = options.pop("switch", {}) or {}
    for key in ("difference_function", "difference_function_all"):
        if options.pop(key, "frobenius") != "frobenius":
            raise UserError(f"--pod_options {key}: only 'frobenius' (L2 distance) is implemented")
    if options:
        raise UserError(f"--pod_options: unknown keys {sorted(options)}; known: switch, difference_function")
    unknown = set(switch) - {"before", "after"}
    if unknown:
        raise UserError(f"--pod_options switch: unknown keys {sorted(unknown)}; known: before, after")
    inner = _apply_switch(base, switch.get("before", {}), "before")
    # The reference reassigns type/factor/prepro/spp_scales while walking the maps, so "after" starts from "before"
    # for those; extra_channels and the adaptive factor are reset for every map.
    last = _apply_switch(replace(inner, extra_channels="sum", adaptive=False), switch.get("after", {}), "after")
    return PODConfig(inner=inner, last=last, schedule=schedule, logits=logits)


def _apply_switch(layer: PODLayer, values: dict, where: str) -> PODLayer:
    changes = {}
    for key, value in values.items():
        if key in _SWITCH_DEFAULT_ONLY:
            if value != _SWITCH_DEFAULT_ONLY[key]:
                raise UserError(f"--pod_options switch.{where}.{key}={value!r} is not implemented")
        elif key in _SWITCH_KEYS:
            changes[_SWITCH_KEYS[key]] = tuple(value) if key == "spp_scales" else value
        else:
            raise UserError(f"--pod_options switch.{where}: unknown key {key!r}; known: "
                            f"{', '.join(sorted(_SWITCH_KEYS) + sorted(_SWITCH_DEFAULT_ONLY))}")
    out = replace(layer, **changes)
    _validate(out, f"--pod_options switch.{where}")
    return out


def _validate(layer: PODLayer, where: str) -> None:
    if layer.collapse not in COLLAPSES:
        raise UserError(f"{where}: POD type {layer.collapse!r} unknown; use one of {', '.join(COLLAPSES)}")
    if layer.prepro not in PREPROS:
        raise UserError(f"{where}: POD prepro {layer.prepro!r} unknown; use one of {', '.join(PREPROS)}")
    if layer.extra_channels not in EXTRA_CHANNELS:
        raise UserError(f"{where}: extra_channels {layer.extra_channels!r} unknown; use sum or trim")
    if not layer.spp_scales or any(int(s) < 1 for s in layer.spp_scales):
        raise UserError(f"{where}: spp_scales must be positive integers, got {list(layer.spp_scales)}")


def collapse_logits(logits: Tensor, n_old: int, mode: str = "sum") -> Tensor:
    """Fold new-class logit channels so the new model's logits match the old ones.

    ``sum``: channel 0 := x_0 + sum of the new channels, channels 1..n_old-1 unchanged; ``trim``: drop new channels.
    logits (B, C, h, w) -> (B, n_old, h, w).
    """
    if mode == "trim":
        return logits[:, :n_old]
    return collapse_new_classes(logits, n_old)


def pod_loss(feats_old: list[Tensor], feats_new: list[Tensor], cfg: PODConfig, *, n_old: int, n_classes: int,
             n_new: int, labels: Tensor | None = None) -> Tensor:
    """POD distillation over a list of maps (old and new lists aligned).

    Args:
        feats_old / feats_new: maps (B, C_i, H_i, W_i); only the last may differ in channels (logits).
        cfg: per-map options.
        n_old, n_classes, n_new: old classes (incl. bg), classes seen so far, classes added this step.
        labels: (B, H, W), only for the adaptive factor.
    Returns:
        scalar: sum over maps of ``factor * schedule * mean_b ||e_old - e_new||`` divided by the number of maps.
    """
    if len(feats_old) != len(feats_new) or not feats_old:
        raise ValueError(f"POD needs aligned non-empty map lists, got {len(feats_old)} and {len(feats_new)}")
    schedule = math.sqrt(n_classes / n_new) if cfg.schedule else 1.0
    total = upcast(feats_new[0]).new_zeros(())
    last = len(feats_old) - 1
    for i, (old, new) in enumerate(zip(feats_old, feats_new)):
        layer = cfg.last if i == last else cfg.inner
        if layer.factor <= 0:
            continue
        if old.shape[1] != new.shape[1]:
            new = collapse_logits(new, n_old, layer.extra_channels)
        e_old = pod_embed(preprocess(upcast(old), layer.prepro), layer.collapse, layer.spp_scales)
        e_new = pod_embed(preprocess(upcast(new), layer.prepro), layer.collapse, layer.spp_scales)
        distance = torch.linalg.vector_norm(e_old - e_new, dim=-1)  # (B,)
        factor = (labels == BACKGROUND).float().mean() if (layer.adaptive and labels is not None) else 1.0
        total = total + layer.factor * schedule * (factor * distance).mean()
    return total / len(feats_old)


@register_term
class PODDistillation(LossTerm):
    """``loss_pod``: POD on ``extras["attentions"]`` (+ ``sem_logits_small`` with ``--pod_logits``) at steps > 0."""

    name = "pod"
    order = 50
    needs_old_model = True
    needs_features = True
    unsupported = (
        ("pod_deeplab_mask", False, "POD restricted to background pixels"),
        ("pod_deeplab_mask_factor", None, "factor of --pod_deeplab_mask"),
        ("deeplab_mask_downscale", False, "mask downscaling of --pod_deeplab_mask"),
        ("pod_large_logits", False, "POD on the upsampled logits"),
    )

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--pod", default=None, choices=list(COLLAPSES),
                            help="PLOP POD feature distillation at steps > 0 (PLOP preset: local)")
        parser.add_argument("--pod_factor", type=nonnegative_float, default=5.0,
                            help="POD weight of the feature maps (PLOP preset: 0.01)")
        parser.add_argument("--pod_options", type=json.loads, default=None,
                            help='JSON options, e.g. {"switch": {"after": {"extra_channels": "sum", '
                                 '"factor": 0.0005, "type": "local"}}} for the last map (the logits)')
        parser.add_argument("--pod_prepro", default="pow", choices=list(PREPROS),
                            help="elementwise map before pooling: pow (square), abs (|x|), relu, none")
        parser.add_argument("--no_pod_schedule", action="store_true", default=False,
                            help="do not multiply POD by sqrt(classes seen / new classes)")
        parser.add_argument("--pod_logits", action="store_true", default=False,
                            help="also distil the pre-upsampling logits (new-class channels folded into background)")
        parser.add_argument("--spp_scales", type=int, nargs="+", default=list(SPP_SCALES),
                            help="pyramid scales of local/global POD")
        parser.add_argument("--pod_apply", default="all", help="(ignored: passed but unused by the reference)")
        parser.add_argument("--pod_interpolate_last", action="store_true", default=False,
                            help="(ignored: parsed but never used by the reference)")
        parser.add_argument("--pod_deeplab_mask", action="store_true", default=False, help=NOT_IMPLEMENTED + "masked POD")
        parser.add_argument("--pod_deeplab_mask_factor", type=float, default=None, help=NOT_IMPLEMENTED + "masked POD factor")
        parser.add_argument("--deeplab_mask_downscale", action="store_true", default=False,
                            help=NOT_IMPLEMENTED + "masked POD downscaling")
        parser.add_argument("--pod_large_logits", action="store_true", default=False,
                            help=NOT_IMPLEMENTED + "POD on upsampled logits")

    @staticmethod
    def config_from(cfg: Any) -> PODConfig:
        return parse_pod_config(collapse=getattr(cfg, "pod", None) or "local",
                                factor=getattr(cfg, "pod_factor", 5.0), prepro=getattr(cfg, "pod_prepro", "pow"),
                                spp_scales=getattr(cfg, "spp_scales", SPP_SCALES),
                                options=getattr(cfg, "pod_options", None),
                                schedule=not getattr(cfg, "no_pod_schedule", False),
                                logits=getattr(cfg, "pod_logits", False))

    @classmethod
    def check(cls, cfg: Any) -> None:
        if getattr(cfg, "pod", None) is not None:
            options = getattr(cfg, "pod_options", None)
            if options is not None and not isinstance(options, dict):
                raise UserError(f"--pod_options must be a JSON object, got {options!r}")
            cls.config_from(cfg)

    def __init__(self, *, config: PODConfig, n_old: int, n_classes: int, n_new: int):
        self.config = config
        self.n_old, self.n_classes, self.n_new = n_old, n_classes, n_new

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "PODDistillation | None":
        if getattr(cfg, "pod", None) is None or ctx.model_old is None:
            return None
        return cls(config=cls.config_from(cfg), n_old=ctx.n_old, n_classes=ctx.n_classes, n_new=ctx.n_new)

    def maps(self, extras: dict) -> list[Tensor]:
        maps = list(extras["attentions"])
        if self.config.logits:
            maps.append(extras["sem_logits_small"])
        return maps

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        loss = pod_loss(self.maps(batch.extras_old), self.maps(batch.extras), self.config, n_old=self.n_old,
                        n_classes=self.n_classes, n_new=self.n_new, labels=batch.labels)
        return {"loss_pod": loss}
