"""DropClass (Chu, Kim and Han, "Learning Debiased and Disentangled Representations for Semantic Segmentation",
NeurIPS 2021; sanghyeokchu/DropClass 0787087) as an extension of any method with 1x1 classifiers: ``--dropclass``.

* model (``model_spec``): the drop path ``g`` of ``modules/dropclass.py`` after the head; evaluation answers through
  it with every class kept.
* each iteration (``compose_batch``): one class ``z`` is drawn from the classes that may be dropped and, with
  probability ``p = epoch / E``, dropped (its importance row left out of the mean); the keep mask goes to the
  model's forward.
* losses (``wrap_terms``): the method's own classification term on both paths,
  ``lambda * L_cls(y, Y) + (1 - lambda) * L_cls(y_drop, Y with z ignored) + alpha * mean softmax(y_drop)[z]`` with
  ``lambda = 1 - epoch / E``; every other term (distillation, regularisers) reads the plain path.
* class-incremental steps: the importance rows of earlier steps' classes are frozen (``prepare_model``,
  ``--dropclass_rows frozen``) and the old model answers with its plain path (``prepare_old_model``: the teacher of
  distillation, pseudo-labels and AWT's attribution, in run.py and attribute.py alike).

docs/dropclass.md lists the choices.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.attribution import unwrap
from methods.base import Batch, Extension, LossTerm, StepContext, TrainInputs
from methods.registry import METHODS, register_extension
from modules import dropclass as _parts  # noqa: F401  (registers the dropclass classifier wrapper)
from utils.loss import suppression
from utils.errors import UserError

log = logging.getLogger(__name__)

IGNORE = 255


def schedule(epoch: int, epochs: int, kind: str = "linear", p_fixed: float = 0.5) -> tuple[float, float]:
    """(lambda, drop probability) of ``epoch`` (counted from 0) out of ``epochs``: DropClass's ``1 - e/E`` and
    ``e/E`` (``linear``), or ``(0.5, p_fixed)`` (``fixed``)."""
    if kind == "fixed":
        return 0.5, p_fixed
    ratio = epoch / max(epochs, 1)
    return 1.0 - ratio, ratio


def droppable_classes(n_old: int, n_classes: int, which: str) -> list[int]:
    """Classes that may be dropped at a step: ``labelled`` = background and the classes with labels at this step
    (every class at step 0), ``all`` = every class seen so far."""
    if which == "all" or n_old == 0:
        return list(range(n_classes))
    return [0] + list(range(n_old, n_classes))


class DropClassLoss(LossTerm):
    """The method's classification term on the plain and the drop path, plus the suppression term."""

    name = "dropclass"

    def __init__(self, inner: LossTerm, alpha: float):
        self.inner, self.alpha = inner, float(alpha)
        self.needs_old_model, self.needs_features = inner.needs_old_model, inner.needs_features

    def before_step(self, ctx: StepContext) -> None:
        self.inner.before_step(ctx)

    def prepare(self, batch: Batch) -> None:
        self.inner.prepare(batch)

    def epoch_notes(self) -> list[str]:
        return self.inner.epoch_notes()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        out = self.inner(batch)
        info = batch.aux.get("dropclass")
        if info is None or "drop_logits" not in batch.extras:  # evaluation-style forward or DropClass off
            return out
        lam, z = info["lambda"], info["z"]
        out["loss_ce"] = lam * out["loss_ce"]
        labels = batch.labels if z is None else batch.labels.masked_fill(batch.labels == z, IGNORE)
        drop_batch = dataclasses.replace(batch, logits=batch.extras["drop_logits"], labels=labels)
        # DropClass's cross-entropy ignores 255 and the dropped class in its mean (valid pixels only); the inner term
        # averages over every pixel (MiB/PLOP), so rescale by all / valid. Tensor maths only: no host sync.
        valid = (labels != IGNORE).sum().clamp(min=1)
        out["loss_ce_drop"] = (1.0 - lam) * self.inner(drop_batch)["loss_ce"] * (labels.numel() / valid)
        if z is not None:
            out["loss_sup"] = self.alpha * suppression(batch.extras["drop_logits_small"], z)
        return out


@register_extension
class DropClass(Extension):
    """``--dropclass``: DropClass on top of the selected method."""

    name = "DropClass"
    description = "DropClass (NeurIPS 2021): class-dropped classifier input, its losses and inference path"
    switches = ("dropclass",)
    needs_classifier = "conv1x1"
    WRAPPER = "dropclass"  # the classifier wrapper of modules/dropclass.py

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--dropclass", action="store_true", default=False,
                           help="DropClass on top of --method: drop path, its losses and inference path "
                                "(docs/dropclass.md); --task offline is the paper's setting")
        group.add_argument("--dropclass_alpha", type=float, default=10.0,
                           help="weight of the suppression term (DropClass: 10)")
        group.add_argument("--dropclass_schedule", default="linear", choices=["linear", "fixed"],
                           help="linear: plain-path weight 1 - e/E and drop probability e/E (DropClass); fixed: "
                                "weight 0.5 and probability --dropclass_p")
        group.add_argument("--dropclass_p", type=float, default=0.5,
                           help="drop probability with --dropclass_schedule fixed")
        group.add_argument("--dropclass_classes", default="labelled", choices=["labelled", "all"],
                           help="classes that may be dropped at a step > 0: background and this step's classes "
                                "(default) or every class seen so far")
        group.add_argument("--dropclass_rows", default="frozen", choices=["frozen", "live"],
                           help="importance rows of earlier steps' classes: frozen when their step ended "
                                "(default) or the current weights (the drifting mean)")
        group.add_argument("--dropclass_steps", default="all", choices=["all", "first"],
                           help="train with DropClass at every step (default) or at step 0 only (later steps train "
                                "and answer with the plain path)")

    @classmethod
    def enabled(cls, cfg: Any, method) -> bool:
        return bool(getattr(cfg, "dropclass", False))

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cfg.dropclass_alpha < 0 or not 0.0 <= cfg.dropclass_p <= 1.0:
            raise UserError(f"--dropclass_alpha must be >= 0 and --dropclass_p in [0, 1], got "
                            f"{cfg.dropclass_alpha} and {cfg.dropclass_p}")
        method = METHODS.get(getattr(cfg, "method", None) or "")
        if method is not None and not method.capabilities.builds_terms:  # refused before anything starts
            raise UserError(f"--dropclass applies the method's classification loss term to its drop path; --method "
                            f"{method.name} trains with its own losses (use MiB, PLOP, RCIL or the other presets)")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.step, self.classes, self.epoch, self.epochs = 0, [], 0, 1
        self.rng = random.Random(0)  # host-side draws: no tensor is read back per iteration

    def active(self, step: int) -> bool:
        return self.options.dropclass_steps == "all" or step == 0

    # ---- model -------------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        return spec.with_wrapper(self.WRAPPER, readout="drop" if self.active(step) else "plain",
                                 rows=self.options.dropclass_rows)

    def prepare_model(self, ctx: StepContext) -> None:
        model = unwrap(ctx.model)
        drop = model.classifier_wrapper
        if ctx.step > 0 and self.options.dropclass_rows == "frozen":
            filled = drop.freeze_rows(model.classifier_rows())
            log.info("step %d: DropClass froze the importance rows of %d classes of the previous step", ctx.step,
                     filled)
        if not self.active(ctx.step):
            drop.train_drop = False
            for p in drop.parameters():
                p.requires_grad_(False)

    def prepare_old_model(self, model_old, step: int) -> None:
        """The teacher answers with its plain path (distillation, pseudo-labels and AWT read the plain path)."""
        drop = getattr(unwrap(model_old), "classifier_wrapper", None)
        if drop is not None:
            drop.readout = "plain"

    # ---- batches and losses ------------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        self.step = ctx.step
        self.classes = droppable_classes(ctx.n_old, ctx.n_classes, self.options.dropclass_classes)
        self.n_classes = ctx.n_classes

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        # the same draws on every rank and after a resume at this epoch
        self.rng.seed(int(self.cfg.random_seed) * 1_000_003 + self.step * 10_007 + epoch)

    def compose_batch(self, inputs: TrainInputs) -> TrainInputs:
        if not self.active(self.step):
            return inputs
        lam, p = schedule(self.epoch, self.epochs, self.options.dropclass_schedule, self.options.dropclass_p)
        z = self.rng.choice(self.classes)
        dropped = self.rng.random() < p
        keep = torch.ones(self.n_classes, dtype=torch.bool)
        if dropped:
            keep[z] = False
        inputs.forward_kwargs["keep"] = keep.to(inputs.images.device, non_blocking=True)
        inputs.aux["dropclass"] = {"lambda": lam, "z": z if dropped else None}
        return inputs

    def wrap_terms(self, terms: list[LossTerm], ctx: StepContext) -> list[LossTerm]:
        if not self.active(ctx.step):
            return terms
        names = [t.name for t in terms]
        if "classification" not in names:
            raise UserError(f"--dropclass needs the method's classification loss term; --method {self.cfg.method} "
                            f"has terms {names}")
        return [DropClassLoss(t, self.options.dropclass_alpha) if t.name == "classification" else t for t in terms]
