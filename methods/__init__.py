"""Continual-learning methods: loss-term registry, presets, flags and the criterion the trainer calls.

Registry order is execution order: pseudo-labelling first (it rewrites ``batch.labels``/``pixel_weight`` in
``prepare``), then classification, output/feature distillation, POD and the regularisers last.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from methods.base import Batch, LossTerm, StepContext, pixel_mean
from methods.presets import METHOD_NAMES, PRESETS, method_name
from utils.errors import UserError

TERMS: dict[str, type[LossTerm]] = {}


def register_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: add a term to ``TERMS`` under ``cls.name`` (registration order = execution order)."""
    if cls.name in TERMS:
        raise ValueError(f"loss term {cls.name!r} registered twice")
    TERMS[cls.name] = cls
    return cls


# Import order fixes the registry order. The imports register the terms.
from methods import pseudo as _pseudo  # noqa: E402,F401
from methods import classification as _classification  # noqa: E402,F401
from methods import distillation as _distillation  # noqa: E402,F401
from methods import pod as _pod  # noqa: E402,F401
from methods import regularizers as _regularizers  # noqa: E402,F401

# Reference ablation flags that belong to no term here (behaviour.md 1.16, 2.6): parsed, rejected when set.
UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("nb_background_modes", 1, "multi-modal background classifier"),
    ("init_multimodal", None, "initialisation of a multi-modal background"),
    ("multimodal_fusion", "sum", "fusion of multi-modal background logits"),
    ("align_weight", None, "WA-style classifier weight alignment"),
    ("align_weight_frequency", "never", "frequency of the weight alignment"),
    ("entropy_min", 0.0, "entropy minimisation on background pixels"),
)


def _add_unsupported_args(group: argparse._ActionsContainer) -> None:
    no = "(not implemented: rejected unless left at the default) "
    group.add_argument("--nb_background_modes", type=int, default=1, help=no + "number of background classifiers")
    group.add_argument("--init_multimodal", default=None,
                       choices=["max", "softmax", "max_init", "softmax_init", "softmax_remove", "max_remove"],
                       help=no + "multi-modal background initialisation")
    group.add_argument("--multimodal_fusion", default="sum", help=no + "fusion of multi-modal background logits")
    group.add_argument("--align_weight", default=None, choices=["old", "background", "all"],
                       help=no + "align new classifier weight norms to the old ones")
    group.add_argument("--align_weight_frequency", default="never", choices=["never", "epoch", "task"],
                       help=no + "when to align weights")
    group.add_argument("--entropy_min", type=float, default=0.0, help=no + "entropy minimisation weight")
    group.add_argument("--entropy_min_mean_pixels", action="store_true", default=False,
                       help="(ignored: parsed but never used by the reference)")


def check_supported(cfg: Any) -> None:
    """Raise ``UserError`` (one line, naming the flag) if ``cfg`` asks for a reference option not implemented here.

    Also runs every term's own ``check`` (e.g. an unknown ``--pseudo`` mode or ``--pod_options`` key).
    Attributes missing from ``cfg`` count as defaults.
    """
    table = list(UNSUPPORTED)
    for term in TERMS.values():
        table.extend(term.unsupported)
    for dest, default, what in table:
        value = getattr(cfg, dest, default)
        if value != default:
            raise UserError(f"--{dest} {value!r} ({what}) is a reference ablation not implemented in this "
                            f"framework; remove the flag (default: {default!r})")
    for term in TERMS.values():
        term.check(cfg)


class Criterion:
    """The enabled terms of one step, called by the trainer (knows no method names)."""

    def __init__(self, terms: list[LossTerm]):
        self.terms = list(terms)

    @property
    def needs_old_model(self) -> bool:
        return any(t.needs_old_model for t in self.terms)

    @property
    def needs_features(self) -> bool:
        return any(t.needs_features for t in self.terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def before_step(self, ctx: StepContext) -> None:
        for term in self.terms:
            term.before_step(ctx)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        for term in self.terms:
            term.prepare(batch)
        losses: dict[str, Tensor] = {}
        for term in self.terms:
            out = term(batch)
            _merge(losses, out, term.name)
        return losses

    def after_backward(self, model: torch.nn.Module, grad_scale: float = 1.0) -> dict[str, Tensor]:
        """Statistics updates on the task-loss gradients, then extra losses for a second backward.

        ``grad_scale``: the AMP GradScaler scale the gradients currently carry (1.0 without fp16 scaling).
        """
        extra: dict[str, Tensor] = {}
        for term in self.terms:
            _merge(extra, term.after_backward(model, grad_scale=grad_scale), term.name)
        return extra

    def state_dict(self) -> dict:
        """``{term name: state}`` for stateful terms; the core stores it as the checkpoint's ``trainer_state``."""
        return {t.name: s for t in self.terms if (s := t.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        """Resume inside a step from ``state_dict()`` output."""
        for term in self.terms:
            if term.name in state:
                term.load_state_dict(state[term.name])


def _merge(into: dict, new: dict, who: str) -> None:
    for key, value in new.items():
        if not key.startswith("loss_"):
            raise ValueError(f"loss term {who!r} returned key {key!r}; keys must start with 'loss_'")
        if key in into:
            raise ValueError(f"loss key {key!r} returned twice (term {who!r})")
        into[key] = value


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--method`` and every term's reference flags (one argument group per term)."""
    group = parser.add_argument_group("method")
    group.add_argument("--method", type=method_name, default=None, choices=METHOD_NAMES,
                       help="named preset of term flags (explicit flags win); case-insensitive, e.g. MIB = MiB")
    for term in TERMS.values():
        term.add_args(parser.add_argument_group(term.name))
    _add_unsupported_args(parser.add_argument_group("PLOP ablations (not implemented)"))


def build_criterion(cfg: Any, ctx: StepContext) -> Criterion:
    """Build the enabled terms for this step from the config (attributes named like the flags' destinations)."""
    check_supported(cfg)
    terms = []
    for cls in TERMS.values():
        term = cls.build(cfg, ctx)
        if term is None:
            continue
        if term.needs_old_model and ctx.model_old is None:
            raise ValueError(f"term {cls.name!r} was built without an old model (step {ctx.step})")
        terms.append(term)
    return Criterion(terms)


__all__ = ["Batch", "LossTerm", "StepContext", "Criterion", "TERMS", "PRESETS", "UNSUPPORTED", "register_term",
           "add_method_args", "build_criterion", "check_supported", "pixel_mean"]
