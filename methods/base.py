"""Building blocks of every continual-learning method: the batch a loss term sees, the term interface, the step context.

A method (MiB, PLOP, ...) is not a class: it is a row of ``methods.presets.PRESETS`` that switches on a combination of
loss terms. Each term owns its command-line flags (``add_args``), decides from the config whether it is active
(``build`` returns None when not) and returns named losses (keys start with ``loss_``).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor


@dataclass
class Batch:
    """What loss terms see for one iteration; terms may replace ``labels`` / ``pixel_weight`` in ``prepare``."""

    images: Tensor  # (B, 3, H, W)
    labels: Tensor  # (B, H, W) int64, masked training labels (after pseudo-labelling)
    logits: Tensor  # (B, C, H, W) new model, upsampled to the input size
    extras: dict  # new model extras ("pre_logits", and with ret_intermediate "body", "attentions", "sem_logits_small")
    logits_old: Tensor | None  # (B, C_old, H, W) old model, computed under no_grad
    extras_old: dict | None
    n_old: int  # classes of previous steps incl. background (0 at step 0)
    n_new: int  # classes added at this step
    pixel_weight: Tensor | None = None  # (B, H, W) or (B, 1, 1): multiplies the per-pixel classification loss
    original_labels: Tensor | None = None  # (B, H, W) labels before pseudo-labelling (set by the pseudo-label term)
    pseudo_mask: Tensor | None = None  # (B, H, W) bool: pixels that received a pseudo-label (set by the pseudo term)


def _null_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class StepContext:
    """Everything a term may need once per step (built by the trainer before the first epoch)."""

    step: int
    classes: list  # classes per step up to the current one, e.g. VOC 15-1 step 2 -> [16, 1, 1]
    model: torch.nn.Module
    model_old: torch.nn.Module | None = None  # None at step 0; frozen, eval mode, unwrapped
    device: torch.device | str = "cpu"
    train_loader: Any = None  # iterable of (images, labels) of the current step
    trainer_state: dict = field(default_factory=dict)  # checkpoint["trainer_state"] of the previous step, or {}
    world_size: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = _null_autocast

    @property
    def n_old(self) -> int:
        """Classes of previous steps including background (0 at step 0)."""
        return sum(self.classes[:-1]) if self.step > 0 else 0

    @property
    def n_new(self) -> int:
        """Classes added at this step (all classes at step 0)."""
        return self.classes[-1]

    @property
    def n_classes(self) -> int:
        """Classes seen so far, this step included (PLOP's ``nb_current_classes``)."""
        return sum(self.classes)


class LossTerm:
    """One loss / regulariser. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str] = "term"
    needs_old_model: bool = False
    needs_features: bool = False
    # (dest, default, what it did in the reference): reference ablation flags this term parses but does not
    # implement; ``methods.check_supported`` rejects a config that sets one of them to another value.
    unsupported: ClassVar[tuple[tuple[str, Any, str], ...]] = ()

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        """Declare the reference flags this term owns (``parser`` is its argument group)."""

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Raise ``UserError`` for an invalid combination of this term's flags (called at startup)."""

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "LossTerm | None":
        """Return the term configured from ``cfg`` for this step, or None when it is disabled."""
        return None

    def before_step(self, ctx: StepContext) -> None:
        """Once per step before training (e.g. PLOP thresholds with a pass of the old model)."""

    def prepare(self, batch: Batch) -> None:
        """Rewrite the batch before any loss is computed (e.g. pseudo-labels, adaptive factors)."""

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """Named losses of this term; keys start with ``loss_``."""
        return {}

    def after_backward(self, model: torch.nn.Module, grad_scale: float = 1.0) -> dict[str, Tensor]:
        """Called after the backward of the task loss; may return extra losses for a second backward."""
        return {}

    def state_dict(self) -> dict:
        """State to store in the checkpoint's ``trainer_state`` (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (resume inside a step)."""


def pixel_mean(loss: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
    """Mean over all B*H*W pixels, ignored ones included, after multiplying by ``pixel_weight`` (reference 2.1)."""
    if pixel_weight is not None:
        loss = loss * pixel_weight
    return loss.mean()
