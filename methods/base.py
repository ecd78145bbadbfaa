"""The interfaces of the methods package: the step plugin (:class:`Method`, :class:`Extension`), the loss term
(:class:`LossTerm`), and what they see (:class:`StepContext`, :class:`TrainInputs`, :class:`Batch`).

A method is a plugin with a lifecycle (docs/architecture.md, "Methods"): it may choose the model family, wrap the
datasets, load and prepare the model of a step, initialise new classifiers, choose the trainable parameters and their
learning rates, rewrite each training batch, provide loss terms, act at the start and end of a step and of each epoch,
post-process predictions, and keep state in checkpoints. Most methods of the PLOP/MiB family only provide loss
terms: they are thin plugins whose ``preset`` switches terms on (``methods/presets.py``). Each term owns its
command-line flags (``add_args``), decides from the config whether it is active (``build`` returns None when not) and
returns named losses (keys start with ``loss_``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from modules.heads import final_layer
from utils.optim import apply_freezing, build_param_groups


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
    aux: dict = field(default_factory=dict)  # per-batch extras of the loader or of Method.compose_batch


@dataclass
class TrainInputs:
    """One training batch on the device before the forward pass; ``Method.compose_batch`` may rewrite it."""

    images: Tensor  # (B, 3, H, W) normalised
    labels: Tensor  # (B, H, W) int64
    aux: dict = field(default_factory=dict)  # extra tensors of the loader (a dataset item's third element)
    forward_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the new model's forward


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
    train_dataset: Any = None  # the step's training dataset as built from the task (before Method.wrap_dataset)
    method: Any = None  # the run's MethodStack (extensions ask it, e.g. for the method's transfer_source)
    lr: float | None = None  # the step's learning rate (--lr of this step)
    checkpoint_path: str | None = None  # the step's final checkpoint; a plugin phase keeps its own in-step file
    # next to it (``{checkpoint_path}.<phase>.partial.pth``), written by rank 0 and removed when the step is done
    resume_from: str | None = None  # the in-step checkpoint the step continues from (None: it starts over); it
    # holds the model after every plugin phase, which is then skipped
    no_auto_resume: bool = False  # --no_auto_resume: a plugin phase starts over too
    amp_dtype: Any = None  # the autocast dtype of the run (None: fp32); fp16 needs a gradient scaler
    optimizer: Any = None  # the step's optimiser (set with the criterion): a plugin that re-initialises weights
    # during the step resets their optimiser state

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


@dataclass(frozen=True)
class WeakLabeler:
    """Pixel labels a weak-step method makes from image labels once it has learnt enough (e.g. WILSON's localizer
    after its warm-up): ``labels(images, img_labels)`` with normalised images (B, 3, H, W) and image labels (B, C - 1)
    on the device returns int64 (B, h, w) in the step's class ids, 255 where it names no class. Valid from the start
    of epoch ``ready_epoch`` (0-based); other plugins use it (AWT's ``--awt_weak localizer``)."""

    ready_epoch: int
    labels: Callable[[Tensor, Tensor], Tensor]


class LossTerm:
    """One loss / regulariser. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str] = "term"
    # execution order among the registered terms (lower first): pseudo-labels 10 rewrite the labels the others read,
    # classification 20, output distillation 30, feature distillation 40, POD 50, weight regularisers 60
    order: ClassVar[int] = 100
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

    def epoch_notes(self) -> list[str]:
        """Warnings about the epoch that just ended (e.g. no pseudo-label accepted), read once per epoch outside
        the iteration loop; counters kept on the device are reset here."""
        return []

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


@dataclass(frozen=True)
class TransferSource:
    """Where AWT attributes and transfers from: the input of the 1x1 conv ``layer`` and its output ``row``; the
    logit attributed is ``row`` of that layer's output."""

    layer: nn.Conv2d
    row: int = 0


INIT_BY_TRANSFER, INIT_OWN, INIT_OWN_THEN_TRANSFER = "transfer", "own", "own+transfer"


@dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself; the stack resolves the run's answers once (``MethodStack``).

    ``classifier_init``: who initialises the new classifier at a step > 0: ``"transfer"`` (the AWT extension: MiB's
    copy of the transfer source with --init_balanced / --orig_init, AWT's masked copy with --att), ``"own"`` (the
    method's ``init_new_classifier``; an AWT transfer replaces it) or ``"own+transfer"`` (the method's, then AWT's
    masked transfer on top)."""

    domain_incremental: bool = True  # can train steps that add domains instead of classes (cityscapes_domain)
    builds_terms: bool = True  # its losses are the registered loss terms their flags enable (their flags apply)
    default_param_groups: bool = True  # trains with the default groups (--freeze*, --lr_old and --fix_bn apply)
    classifier_init: str = INIT_BY_TRANSFER
    classifier: str = "conv1x1"  # the per-step classifier kind its models have (a key of modules CLASSIFIERS)
    exemplar_memory: bool = False  # keeps old images (its --mem_size, one flag shared by every such method)
    weak_steps: bool = False  # can train a step from image-level labels only (--weakly: every pixel label is 255)
    weak_refusal: str = "it trains on pixel labels"  # why not, for the one-line refusal


@functools.lru_cache(maxsize=None)
def plugin_dests(plugin: type) -> tuple[str, ...]:
    """The destinations of the flags a plugin class declares (``add_args``), in declaration order."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group(plugin.name or plugin.__name__)
    plugin.add_args(group)
    return tuple(a.dest for a in group._group_actions)


@functools.lru_cache(maxsize=None)
def options_class(plugin: type) -> type:
    """A frozen dataclass ``{Name}Options`` whose fields are the plugin's own flags, typed from their parser."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group(plugin.name or plugin.__name__)
    plugin.add_args(group)
    fields = []
    for action in group._group_actions:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            kind: Any = bool
        elif action.nargs not in (None, "?"):
            kind = list
        elif action.type in (int, float, str):
            kind = action.type
        else:
            kind = Any
        fields.append((action.dest, kind))
    name = "".join(part.capitalize() for part in (plugin.name or plugin.__name__).replace("-", "_").split("_"))
    return dataclasses.make_dataclass(f"{name}Options", fields, frozen=True)


def plugin_options(plugin: type, cfg: Any):
    """The plugin's frozen options object: its own flags' values in ``cfg`` (defaults where ``cfg`` lacks them)."""
    cls = options_class(plugin)
    parser = argparse.ArgumentParser(add_help=False)
    plugin.add_args(parser.add_argument_group("defaults"))
    defaults = {a.dest: a.default for a in parser._actions}
    return cls(**{f.name: getattr(cfg, f.name, defaults.get(f.name)) for f in dataclasses.fields(cls)})


class Method:
    """A continual-learning method: a plugin whose hooks the step flow calls in this order (each is optional)::

        model_spec -> wrap_dataset -> [step > 0: prepare_old_model, previous weights loaded] -> prepare_model
        -> init_new_classifier (as the stack's init plan says) -> after_init
        -> param_groups -> terms -> wrap_terms -> (resume: load_state_dict) -> before_step
        -> per epoch: begin_epoch -> per iteration: compose_batch, losses (terms), backward, after_backward (terms)
        -> after_step -> state_dict (checkpoint) ; evaluation and test: predict

    ``name`` is the ``--method`` value; ``preset`` the flag defaults it applies (explicit flags win);
    ``capabilities`` what it declares (:class:`Capabilities`); ``ignored_flags`` the reference flags its published
    scripts pass and it accepts without effect (``{dest: why}``, listed in its ``--help`` group). Its own flags
    (``add_args``) reach it as the frozen ``self.options``; a flag of a plugin that is not active is refused.
    """

    name: ClassVar[str] = ""
    preset: ClassVar[dict] = {}
    description: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    ignored_flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def preset_for(cls, dataset: str | None) -> dict:
        """The flag defaults ``--method NAME`` applies on ``dataset`` (``preset`` unless a method's published
        scripts differ per dataset)."""
        return cls.preset

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        """Declare the flags this method owns (``group`` is its argument group)."""

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Raise ``UserError`` for a flag combination this method cannot run (called before anything starts)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.options = plugin_options(type(self), cfg)

    # ---- model ---------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        """The ``segmentation_module.ModelSpec`` of the model of ``step`` (backbone, head, classifier family)."""
        return spec

    def prepare_model(self, ctx: StepContext) -> None:
        """After the previous weights are loaded (every step): e.g. merge branches, freeze parts."""

    def prepare_old_model(self, model_old: nn.Module, step: int) -> None:
        """The frozen previous-step model, loaded as the teacher of ``step`` (training, attribute.py): e.g. choose
        the output it answers with."""

    def init_new_classifier(self, ctx: StepContext) -> bool:
        """Initialise the new classifier at step > 0 (called when the stack's init plan gives it the job); True
        when it did."""
        return False

    def weak_labeler(self, ctx: StepContext) -> WeakLabeler | None:
        """Pixel labels from image labels at a weak step (None: the method makes none)."""
        return None

    def after_init(self, ctx: StepContext) -> None:
        """After the new classifier is initialised (step > 0, every plugin, before the optimiser exists): e.g.
        NeST's pre-tuning of the new classifier with everything else frozen."""

    def transfer_source(self, model: nn.Module) -> TransferSource:
        """The classifier AWT transfers from and the logit it attributes: by default the background row of the
        first step's classifier."""
        return TransferSource(final_layer(model.cls[0]), 0)

    # ---- optimisation --------------------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        """Freeze what must not train and return the optimiser's parameter groups (the reference's groups)."""
        apply_freezing(model, self.cfg, step)
        return build_param_groups(model, self.cfg, lr, step)

    # ---- data ------------------------------------------------------------------------------------------------------
    def wrap_dataset(self, split: str, dataset: Dataset, step: int) -> Dataset:
        """``split`` in ("train", "val", "test"); items are ``(image, label)`` or ``(image, label, aux dict)``."""
        return dataset

    def compose_batch(self, inputs: TrainInputs) -> TrainInputs:
        """Rewrite a training batch before the forward pass (relabelling, memory mixing, forward arguments)."""
        return inputs

    # ---- losses ----------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list["LossTerm"]:
        """The loss terms of this step, in execution order."""
        return []

    def wrap_terms(self, terms: list["LossTerm"], ctx: StepContext) -> list["LossTerm"]:
        """Rewrite the terms every plugin provided (e.g. DropClass applies the classification term to two paths)."""
        return terms

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        """Once before the first epoch (after a resume): e.g. rebuild an exemplar memory."""

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """At the start of every training epoch (``epoch`` counts from 0)."""

    def after_step(self, ctx: StepContext) -> None:
        """After the last epoch, before the step checkpoint is written."""

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def predict(self, logits: Tensor) -> Tensor:
        """Scores whose argmax over dim 1 is the prediction (evaluation and test); (B, C, H, W)."""
        return logits

    # ---- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Stored in the checkpoint's ``trainer_state["methods"][name]`` (omitted when empty)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (resume inside a step)."""


class Extension(Method):
    """A plugin composed with the selected method when its own flags ask for it (e.g. AWT with ``--att``).

    ``switches``: its flags that decide whether it is enabled (always accepted); its other flags are refused while
    it is off."""

    switches: ClassVar[tuple[str, ...]] = ()
    needs_classifier: ClassVar[str | None] = None  # the classifier kind it works on (None: any)
    transfer_hint: ClassVar[str] = ""  # flags that make it transfer into the new classifier (for messages)
    supersedes: ClassVar[tuple[str, ...]] = ()  # extensions whose transfer plan its own replaces when both have one
    conflicts: ClassVar[tuple[str, ...]] = ()  # extensions it cannot run with (refused, one line)

    @classmethod
    def enabled(cls, cfg: Any, method: type[Method]) -> bool:
        """Whether the flags ask for it on top of ``method`` (the ``--method`` plugin class)."""
        return False

    @classmethod
    def transfer_plan(cls, cfg: Any, method: type[Method]) -> Any:
        """How it initialises the new classifier on top of ``method`` (None: it does not); the stack's init plan
        holds the answer (``MethodStack.init_plan``)."""
        return None

    @classmethod
    def switch_hint(cls) -> str:
        return ", ".join(f"--{s}" for s in cls.switches) or cls.name

    @classmethod
    def label(cls, cfg: Any, method: type[Method]) -> str | None:
        """How the default ``--name`` names this extension when enabled (None: it adds nothing to the name, e.g.
        an initialisation the method's own preset asks for)."""
        return cls.name
