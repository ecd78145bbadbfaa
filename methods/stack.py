"""The plugins of a run composed in a fixed order: the method chosen with ``--method`` first, then every extension
whose flags ask for it (registration order). The step flow talks to this object only."""
from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from methods.base import Extension, LossTerm, Method, StepContext, TrainInputs, TransferSource
from methods.criterion import Criterion, check_supported
from methods.registry import EXTENSIONS, METHODS

log = logging.getLogger(__name__)
DEFAULT_METHOD = "FT"  # without --method, the terms switched on by explicit flags (FT's preset is empty)


class MethodStack:
    """``plugins[0]`` is the method; the rest are extensions. Hooks run in that order."""

    def __init__(self, plugins: list[Method]):
        if not plugins or isinstance(plugins[0], Extension):
            raise ValueError("a method stack starts with a method")
        self.plugins = list(plugins)

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

    def load_previous(self, model: nn.Module, model_old: nn.Module, step: int) -> None:
        self.method.load_previous(model, model_old, step)

    def transfer_source(self, model: nn.Module) -> TransferSource:
        return self.method.transfer_source(model)

    def prepare_model(self, ctx: StepContext) -> None:
        for plugin in self.plugins:
            plugin.prepare_model(ctx)

    def prepare_old_model(self, model_old: nn.Module, step: int) -> None:
        for plugin in self.plugins:
            plugin.prepare_old_model(model_old, step)

    def init_new_classifier(self, ctx: StepContext) -> None:
        done = [p.name for p in self.plugins if p.init_new_classifier(ctx)]
        if not done:
            log.info("step %d: new classifier keeps its random initialisation (no --att, --orig_init, "
                     "--init_balanced or method-specific initialisation)", ctx.step)

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


def build_method(cfg: Any) -> MethodStack:
    """The method of ``--method`` (default: the terms enabled by flags) and every extension its flags enable;
    ``UserError`` when a flag asks for something the plugins or terms cannot do."""
    check_supported(cfg)
    method_cls = METHODS[getattr(cfg, "method", None) or DEFAULT_METHOD]
    extensions = [cls for cls in EXTENSIONS.values() if cls.enabled(cfg)]
    for cls in [method_cls, *extensions]:
        cls.check(cfg)
    return MethodStack([cls(cfg) for cls in [method_cls, *extensions]])
