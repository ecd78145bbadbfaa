"""The criterion the trainer calls (the enabled loss terms of a step), the reference ablation flags that no term
implements, and the method flags of the command line."""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from methods.base import Batch, LossTerm, StepContext
from methods.registry import EXTENSIONS, METHODS, TERMS, method_name, ordered_terms
from utils.errors import UserError
from utils.flags import NOT_IMPLEMENTED, nonnegative_int

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
    group.add_argument("--nb_background_modes", type=int, default=1, help=NOT_IMPLEMENTED + "number of background classifiers")
    group.add_argument("--init_multimodal", default=None,
                       choices=["max", "softmax", "max_init", "softmax_init", "softmax_remove", "max_remove"],
                       help=NOT_IMPLEMENTED + "multi-modal background initialisation")
    group.add_argument("--multimodal_fusion", default="sum", help=NOT_IMPLEMENTED + "fusion of multi-modal background logits")
    group.add_argument("--align_weight", default=None, choices=["old", "background", "all"],
                       help=NOT_IMPLEMENTED + "align new classifier weight norms to the old ones")
    group.add_argument("--align_weight_frequency", default="never", choices=["never", "epoch", "task"],
                       help=NOT_IMPLEMENTED + "when to align weights")
    group.add_argument("--entropy_min", type=float, default=0.0, help=NOT_IMPLEMENTED + "entropy minimisation weight")
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

    def epoch_notes(self) -> list[str]:
        return [note for term in self.terms for note in term.epoch_notes()]

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


def _owned_group(parser: argparse.ArgumentParser, owner: type, title: str, description: str | None = None):
    """``owner.add_args`` in a group of its own; every flag it declares records its owner (``ciss_owner``), which
    the flag-ownership rule (``methods.options``) reads."""
    group = parser.add_argument_group(title, description)
    owner.add_args(group)
    for action in group._group_actions:
        action.ciss_owner = owner
    return group


def _ignored_note(plugin: type) -> str | None:
    if not plugin.ignored_flags:
        return None
    return "accepted without effect with --method " + plugin.name + ": " + "; ".join(
        f"--{dest} ({why})" for dest, why in plugin.ignored_flags.items())


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--method``, every term's reference flags (one argument group per term), the reference ablation flags
    that are parsed but not implemented, and the flags of every registered method (a method that inherits its
    flags, e.g. SSUL-M, shares its parent's group)."""
    group = parser.add_argument_group("method")
    group.add_argument("--method", type=method_name, default=None, choices=list(METHODS),
                       help="named method: a plugin and its preset of flags (explicit flags win); "
                            "case-insensitive, e.g. MIB = MiB")
    for term in ordered_terms():
        _owned_group(parser, term, term.name)
    _add_unsupported_args(parser.add_argument_group("PLOP ablations (not implemented)"))
    declared = set()
    for plugin in METHODS.values():
        if plugin.add_args in declared:
            continue
        declared.add(plugin.add_args)
        _owned_group(parser, plugin, plugin.name, _ignored_note(plugin))  # argparse hides groups without flags
    keepers = tuple(p for p in METHODS.values() if p.capabilities.exemplar_memory)
    if keepers:  # one flag for every method with an exemplar memory (the reference scripts all call it --mem_size)
        group = parser.add_argument_group("exemplar memory")
        action = group.add_argument("--mem_size", type=nonnegative_int, default=None,
                                    help="images in the exemplar memory over all old classes (default: 0 for SSUL, "
                                         "DKD and STAR; SSUL-M and DKD-M 100, on ADE20K 300; STAR-M 50)")
        action.ciss_owner = keepers


def add_extension_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags of every registered extension, one argument group each."""
    for plugin in EXTENSIONS.values():
        _owned_group(parser, plugin, plugin.name)


def build_terms(cfg: Any, ctx: StepContext) -> list[LossTerm]:
    """The registered loss terms that ``cfg`` enables for this step, in their declared execution order."""
    terms = []
    for cls in ordered_terms():
        term = cls.build(cfg, ctx)
        if term is None:
            continue
        if term.needs_old_model and ctx.model_old is None:
            raise ValueError(f"term {cls.name!r} was built without an old model (step {ctx.step})")
        terms.append(term)
    return terms


def build_criterion(cfg: Any, ctx: StepContext) -> Criterion:
    """The criterion of the registered terms enabled by ``cfg`` (what the FT ... PLOP methods use)."""
    check_supported(cfg)
    return Criterion(build_terms(cfg, ctx))
