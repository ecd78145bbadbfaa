"""Weight regularisers EWC, RW (Riemannian Walk) and PI (Path Integral / SI), behaviour.md 2.7.

Order per iteration (reference): the task-loss backward, then ``update`` on those gradients, then the penalty gets its
own backward: ``after_backward`` does the update and returns ``{"loss_reg": reg_importance * penalty}``.
Statistics of a step are stored in the checkpoint's ``trainer_state["regularizer"]`` (``state_dict``); the next step
loads them as the "old" importance from ``ctx.trainer_state`` and penalises ``(theta - theta_old)**2`` with it.

Fixes: the update runs on every rank (the reference updated on rank 0 only; under DDP the gradients are all-reduced
before ``after_backward``, so every rank computes the same statistics); parameters without gradient (frozen) are
skipped instead of crashing; old parameters are copies of the old model's, not references.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Iterator

import torch
from torch import Tensor

from methods.registry import register_term
from methods.base import LossTerm, StepContext
from utils.errors import UserError
from utils.flags import nonnegative_float, positive_int

LOG = logging.getLogger(__name__)
NORM_EPS = 1e-8  # normalize_fn denominator
PI_EPS = 1e-20  # PI importance denominator
RW_EPS = 1e-8  # RW score denominator
KINDS = ("ewc", "rw", "pi")


def normalize_fn(t: Tensor) -> Tensor:
    """Min-max normalisation of one tensor to [0, 1]."""
    return (t - t.min()) / (t.max() - t.min() + NORM_EPS)


def named_params(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Trainable parameters of the unwrapped model, names without a DDP ``module.`` prefix."""
    model = getattr(model, "module", model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name.removeprefix("module."), p


def _copy_params(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, Tensor]:
    model = getattr(model, "module", model)
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


@register_term
class Regularizer(LossTerm):
    """EWC / RW / PI selected by ``--regularizer``; active at every step (statistics at step 0, penalty from 1)."""

    name = "regularizer"
    order = 60

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--regularizer", default=None, choices=list(KINDS),
                            help="weight regulariser (EWC/RW/PI presets)")
        parser.add_argument("--reg_importance", type=nonnegative_float, default=1.0,
                            help="weight of the regulariser penalty (EWC/RW/PI presets: 100; MiB used 500 for EWC/PI)")
        parser.add_argument("--reg_alpha", type=float, default=0.9,
                            help="EMA factor of the Fisher information (EWC, RW): F = a*g^2 + (1-a)*F")
        parser.add_argument("--reg_no_normalize", action="store_true", default=False,
                            help="do not min-max normalise the old importance tensors")
        parser.add_argument("--reg_iterations", type=positive_int, default=10, help="RW: iterations between score updates")

    @classmethod
    def check(cls, cfg: Any) -> None:
        if getattr(cfg, "regularizer", None) == "rw" and getattr(cfg, "reg_iterations", 10) < 1:
            raise UserError("--reg_iterations must be >= 1")

    def __init__(self, *, kind: str, model: torch.nn.Module, model_old: torch.nn.Module | None,
                 previous: dict | None, importance: float = 1.0, alpha: float = 0.9, normalize: bool = True,
                 iterations: int = 10):
        if kind not in KINDS:
            raise ValueError(f"unknown regularizer {kind!r}")
        self.kind, self.importance, self.alpha = kind, importance, alpha
        self.normalize, self.iterations = normalize, iterations
        self.iteration = 0
        self.model = model  # the trained model (its current values give PI's importance at save time)
        self.start = _copy_params(model, trainable_only=True)  # step-start values
        self.fisher = {n: torch.ones_like(p) for n, p in self.start.items()} if kind in ("ewc", "rw") else {}
        self.delta = {n: torch.zeros_like(p) for n, p in self.start.items()} if kind == "pi" else {}
        self.score = {n: torch.zeros_like(p) for n, p in self.start.items()} if kind == "rw" else {}
        self.previous_params = {n: p.clone() for n, p in self.start.items()}  # PI theta_prev / RW theta_tmp
        self._resumed_window: dict[str, Tensor] = {}  # RW theta_tmp restored by load_state_dict
        self.old_params = _copy_params(model_old) if model_old is not None else {}
        self.old_score_raw: dict[str, Tensor] = {}
        self.old_importance: dict[str, Tensor] = {}
        if model_old is not None:
            self._load_previous(previous)

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "Regularizer | None":
        kind = getattr(cfg, "regularizer", None)
        if kind is None:
            return None
        return cls(kind=kind, model=ctx.model, model_old=ctx.model_old,
                   previous=(ctx.trainer_state or {}).get("regularizer"),
                   importance=getattr(cfg, "reg_importance", 1.0), alpha=getattr(cfg, "reg_alpha", 0.9),
                   normalize=not getattr(cfg, "reg_no_normalize", False),
                   iterations=getattr(cfg, "reg_iterations", 10))

    # ---- previous step ------------------------------------------------------------------------------------------
    def _load_previous(self, previous: dict | None) -> None:
        if not previous:
            LOG.warning("regularizer %s: no statistics in the previous checkpoint; no penalty this step", self.kind)
            return
        if previous.get("type") != self.kind:
            raise UserError(f"--regularizer {self.kind}: the previous step's checkpoint holds "
                            f"{previous.get('type')!r} statistics; use the same --regularizer at every step")
        norm = normalize_fn if self.normalize else (lambda t: t)
        score = {n: t.to(self.old_params[n].device) for n, t in previous.get("score", {}).items()
                 if n in self.old_params}
        fisher = {n: t.to(self.old_params[n].device) for n, t in previous.get("fisher", {}).items()
                  if n in self.old_params}
        self.old_score_raw = score
        for n, f in fisher.items():  # the Fisher EMA continues from the previous step's; new keys start at ones
            if n in self.fisher and self.fisher[n].shape == f.shape:
                self.fisher[n] = f.detach().clone().to(self.fisher[n])
        if self.kind == "ewc":
            self.old_importance = {n: norm(f) for n, f in fisher.items()}
        elif self.kind == "pi":
            self.old_importance = {n: norm(s) for n, s in score.items()}
        else:
            self.old_importance = {n: norm(fisher[n]) + norm(score[n]) for n in fisher if n in score}

    # ---- per iteration ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: torch.nn.Module, grad_scale: float = 1.0) -> None:
        """Update the statistics with the gradients currently in ``.grad`` (divided by the AMP ``grad_scale``).

        RW follows the reference order (behaviour notes 11.3): every ``--reg_iterations`` calls (from the first) the
        score takes a path-integral step with the Fisher *before* this call's update and the window start
        ``theta_tmp`` moves to the current parameters; then the call count and the Fisher EMA are updated."""
        params = [(n, p) for n, p in named_params(model) if p.grad is not None and n in self.start]
        grads = [p.grad.detach().float() / grad_scale for _, p in params]
        if grad_scale != 1.0 and grads and not torch.stack([g.isfinite().all() for g in grads]).all():
            return  # fp16 overflow: the GradScaler skips this optimizer step, skip the statistics too
        if self.kind == "rw" and self.iteration % self.iterations == 0:
            for (n, p), g in zip(params, grads):
                theta = p.detach()
                if self.iteration > 0:
                    step = self.previous_params[n] - theta
                    self.score[n] += g * step / (0.5 * self.fisher[n] * step.pow(2) + RW_EPS)
                self.previous_params[n] = theta.clone()
        self.iteration += 1
        for (n, p), g in zip(params, grads):
            theta = p.detach()
            if self.kind in ("ewc", "rw"):
                self.fisher[n] = self.alpha * g.pow(2) + (1 - self.alpha) * self.fisher[n]
            if self.kind == "pi":
                self.delta[n] += g * (self.previous_params[n] - theta)
                self.previous_params[n] = theta.clone()

    def penalty(self, model: torch.nn.Module) -> Tensor | None:
        """``sum_n importance_old_n * (theta_n - theta_old_n)**2`` over parameters of the old model (None if none)."""
        total = None
        for n, p in named_params(model):
            if n in self.old_importance and self.old_params[n].shape == p.shape:
                term = (self.old_importance[n] * (p - self.old_params[n]).pow(2)).sum()
                total = term if total is None else total + term
        return total

    def after_backward(self, model: torch.nn.Module, grad_scale: float = 1.0) -> dict[str, Tensor]:
        self.update(model, grad_scale)
        penalty = self.penalty(model)
        return {} if penalty is None else {"loss_reg": self.importance * penalty}

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def _pi_score(self) -> dict[str, Tensor]:
        """PI importance at save time: max(0, delta / (theta - theta_ref)^2) + old score (summed, as the reference)."""
        out = {}
        current_params = dict(named_params(self.model))
        for n, d in self.delta.items():
            current = current_params[n].detach() if n in current_params else self.previous_params[n]
            ref = self.old_params[n] if n in self.old_params and self.old_params[n].shape == d.shape else self.start[n]
            s = (d / ((current - ref).pow(2) + PI_EPS)).clamp(min=0)
            if n in self.old_score_raw and self.old_score_raw[n].shape == s.shape:
                s = s + self.old_score_raw[n]
            out[n] = s
        return out

    def _rw_score(self) -> dict[str, Tensor]:
        """max(0, score), averaged with the previous step's raw score where one exists for the parameter (the
        reference halves only then)."""
        out = {}
        for n, s in self.score.items():
            old = self.old_score_raw.get(n)
            out[n] = 0.5 * (s.clamp(min=0) + old) if old is not None and old.shape == s.shape else s.clamp(min=0)
        return out

    def state_dict(self) -> dict:
        """``fisher``/``score`` are what the next step uses; ``running`` lets a resumed run continue this step."""
        state: dict[str, Any] = {"type": self.kind, "iteration": self.iteration}
        if self.kind == "ewc":
            state["fisher"] = dict(self.fisher)
        elif self.kind == "pi":
            state["score"] = self._pi_score()
            state["running"] = {"delta": dict(self.delta), "start": dict(self.start)}
        else:
            state["fisher"] = dict(self.fisher)
            state["score"] = self._rw_score()
            state["running"] = {"score": dict(self.score), "window_start": dict(self.previous_params)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume inside a step (``theta_prev`` restarts from the loaded parameters, RW's window start from the saved
        one)."""
        if state.get("type") != self.kind:
            raise UserError(f"checkpoint holds {state.get('type')!r} regularizer statistics, not {self.kind!r}")
        self.iteration = int(state.get("iteration", 0))
        running = state.get("running", {})
        for target, source in ((self.fisher, state.get("fisher", {})), (self.delta, running.get("delta", {})),
                               (self.score, running.get("score", {})), (self.start, running.get("start", {}))):
            for n, t in source.items():
                if n in target:
                    target[n] = t.to(target[n].device, target[n].dtype)
        self._resumed_window = {n: t.to(self.start[n].device, self.start[n].dtype)
                                for n, t in running.get("window_start", {}).items() if n in self.start}

    def before_step(self, ctx: StepContext) -> None:
        # theta_prev / theta_tmp follow the model actually trained (after a resume, the loaded weights; RW's window
        # start is the one saved with the resumed checkpoint).
        self.model = ctx.model
        self.previous_params = _copy_params(ctx.model, trainable_only=True)
        self.previous_params.update(self._resumed_window)
