"""The plugins of a run composed in a fixed order: the method chosen with ``--method`` first, then every extension
whose flags ask for it (registration order). The step flow talks to this object only; it is built once per call
(:func:`build_method`) and passed down.

The stack resolves once what the plugins declare (``Capabilities``: checked against the run by
:func:`check_capabilities`) and who initialises the new classifier at a step > 0 (:class:`InitPlan`, the one place
that answers it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from dataset.tasks import is_domain_incremental
from methods.base import (INIT_BY_TRANSFER, INIT_OWN_THEN_TRANSFER, Extension, LossTerm, Method, StepContext,
                          TrainInputs, TransferSource, WeakLabeler)
from methods.criterion import Criterion, check_supported
from methods.registry import EXTENSIONS, METHODS
from utils.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_METHOD = "FT"  # without --method, the terms switched on by explicit flags (FT's preset is empty)


@dataclass(frozen=True)
class InitPlan:
    """Who initialises the new classifier at a step > 0: the method's own ``init_new_classifier`` (``method``), an
    extension's transfer (``transfer``: the plan the extension ``by`` returned, e.g. AWT's), both (the method
    first), or nobody (it keeps its random initialisation)."""

    method: bool = False
    transfer: Any = None
    by: str | None = None


def default_method(weakly: bool) -> str:
    """The method of a command line without ``--method``: the one that learns weak steps when ``--weakly`` is given
    (WILSON's published lines name no method), else the flag-enabled terms."""
    if weakly:
        return next(name for name, cls in METHODS.items() if cls.capabilities.weak_steps)
    return DEFAULT_METHOD


def resolve_plugins(cfg: Any) -> tuple[type[Method], list[type[Extension]]]:
    """The ``--method`` plugin class and the extension classes its flags enable, without building them."""
    method_cls = METHODS[getattr(cfg, "method", None) or default_method(getattr(cfg, "weakly", False))]
    return method_cls, [cls for cls in EXTENSIONS.values() if cls.enabled(cfg, method_cls)]


def resolve_init_plan(cfg: Any, method_cls: type[Method], extensions: list[type[Extension]]) -> InitPlan:
    transfers = [(ext, plan) for ext in extensions if (plan := ext.transfer_plan(cfg, method_cls)) is not None]
    superseded = {name for ext, _ in transfers for name in ext.supersedes}
    transfers = [(ext.name, plan) for ext, plan in transfers if ext.name not in superseded]
    if len(transfers) > 1:
        raise UserError(f"{' and '.join(n for n, _ in transfers)} both initialise the new classifier: keep one")
    by, transfer = transfers[0] if transfers else (None, None)
    mode = method_cls.capabilities.classifier_init
    own = mode != INIT_BY_TRANSFER and (transfer is None or mode == INIT_OWN_THEN_TRANSFER)
    return InitPlan(method=own, transfer=transfer, by=by)


class MethodStack:
    """``plugins[0]`` is the method; the rest are extensions. Hooks run in that order."""

    def __init__(self, plugins: list[Method], init_plan: InitPlan | None = None):
        if not plugins or isinstance(plugins[0], Extension):
            raise ValueError("a method stack starts with a method")
        self.plugins = list(plugins)
        self.init_plan = init_plan or InitPlan(method=type(plugins[0]).capabilities.classifier_init
                                               != INIT_BY_TRANSFER)

    @property
    def method(self) -> Method:
        return self.plugins[0]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    # ---- model -----------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        for plugin in self.plugins:
            spec = plugin.model_spec(spec, step)
        return spec

    def transfer_source(self, model: nn.Module) -> TransferSource:
        return self.method.transfer_source(model)

    def prepare_model(self, ctx: StepContext) -> None:
        for plugin in self.plugins:
            plugin.prepare_model(ctx)

    def weak_labeler(self, ctx: StepContext) -> WeakLabeler | None:
        return self.method.weak_labeler(ctx)

    def prepare_old_model(self, model_old: nn.Module, step: int) -> None:
        for plugin in self.plugins:
            plugin.prepare_old_model(model_old, step)

    def init_new_classifier(self, ctx: StepContext) -> None:
        """As :attr:`init_plan` says: the method's own initialisation, then the extensions' (AWT's transfer)."""
        plan = self.init_plan
        if plan.method:
            self.method.init_new_classifier(ctx)
        if plan.transfer is not None:
            for plugin in self.plugins[1:]:
                if plugin.name == plan.by:
                    plugin.init_new_classifier(ctx)
        if not plan.method and plan.transfer is None:
            log.info("step %d: new classifier keeps its random initialisation (no --att, --orig_init, "
                     "--init_balanced or method-specific initialisation)", ctx.step)
        for plugin in self.plugins:
            plugin.after_init(ctx)

    # ---- optimisation and losses -----------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        return self.method.param_groups(model, lr, step)

    def criterion(self, ctx: StepContext) -> Criterion:
        terms: list[LossTerm] = []
        for plugin in self.plugins:
            terms += plugin.terms(ctx)
        for plugin in self.plugins:
            terms = plugin.wrap_terms(terms, ctx)
        return Criterion(terms)

    # ---- data --------------------------------------------------------------------------------------------------------
    def wrap_dataset(self, split: str, dataset: Dataset, step: int) -> Dataset:
        for plugin in self.plugins:
            dataset = plugin.wrap_dataset(split, dataset, step)
        return dataset

    def compose_batch(self, inputs: TrainInputs) -> TrainInputs:
        for plugin in self.plugins:
            inputs = plugin.compose_batch(inputs)
        return inputs

    # ---- lifecycle ---------------------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        for plugin in self.plugins:
            plugin.before_step(ctx)

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        for plugin in self.plugins:
            plugin.begin_epoch(epoch, epochs)

    def after_step(self, ctx: StepContext) -> None:
        for plugin in self.plugins:
            plugin.after_step(ctx)

    def predict(self, logits: Tensor) -> Tensor:
        for plugin in self.plugins:
            logits = plugin.predict(logits)
        return logits

    # ---- state -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {p.name: s for p in self.plugins if (s := p.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for plugin in self.plugins:
            if plugin.name in state:
                plugin.load_state_dict(state[plugin.name])


def check_capabilities(cfg: Any, method_cls: type[Method], extensions: list[type[Extension]]) -> None:
    """What the plugins declare against the run: a plugin that cannot train domain-incremental steps on such a
    dataset, or an extension that needs another classifier kind than the method's, is refused (one line)."""
    names = {ext.name for ext in extensions}
    for ext in extensions:
        clash = [name for name in ext.conflicts if name in names]
        if clash:
            raise UserError(f"{ext.switch_hint()} ({ext.name}) does not compose with {clash[0]}: use one of them")
        kind = method_cls.capabilities.classifier
        if ext.needs_classifier is not None and kind != ext.needs_classifier:
            raise UserError(f"{ext.switch_hint()} needs {ext.needs_classifier} classifiers; --method "
                            f"{method_cls.name} has {kind} classifiers (remove {ext.switch_hint()})")
    if getattr(cfg, "weakly", False):
        for cls in [method_cls, *extensions]:
            if not cls.capabilities.weak_steps:
                raise UserError(f"--weakly trains steps >= 1 on image-level labels only (every pixel label is "
                                f"ignored), which {cls.name} cannot use: {cls.capabilities.weak_refusal}; drop "
                                "--weakly or use a method with weak-step support")
    dataset = getattr(cfg, "dataset", None)
    if dataset is not None and is_domain_incremental(dataset):
        for cls in [method_cls, *extensions]:
            if not cls.capabilities.domain_incremental:
                raise UserError(f"{cls.name} is class-incremental: it has no meaning on {dataset}, whose steps add "
                                "cities and keep the classes; use a method that supports domain-incremental steps "
                                "(e.g. --method FT with --pod, or RCIL)")


def build_method(cfg: Any) -> MethodStack:
    """The method of ``--method`` (default: the terms enabled by flags) and every extension its flags enable;
    ``UserError`` when a flag asks for something the plugins or terms cannot do. Build it once per call."""
    check_supported(cfg)
    method_cls, extensions = resolve_plugins(cfg)
    check_capabilities(cfg, method_cls, extensions)
    for cls in [method_cls, *extensions]:
        cls.check(cfg)
    plan = resolve_init_plan(cfg, method_cls, extensions)
    return MethodStack([cls(cfg) for cls in [method_cls, *extensions]], plan)
