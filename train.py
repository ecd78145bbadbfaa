"""The training engine: one epoch of training, one evaluation pass. It knows tensors and loss dicts only.

Loss terms come from ``methods`` through a ``Criterion``; this file never sees a method or dataset name.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dataset.transform import images_to_device, labels_to_device
from methods.base import Batch, LossTerm, TrainInputs
from metrics.stream_metrics import ConfusionMatrix
from utils.checkpoint import finite_flags
from utils.dist import all_reduce_sum
from utils.errors import UserError
from utils.logger import progress_bar
from utils.progress import duration, eta, track

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite; the message names the step, iteration and every loss term."""


@dataclass(frozen=True)
class Precision:
    """Autocast settings shared by training, evaluation and the old model's forward."""
    device_type: str
    dtype: torch.dtype | None  # None = fp32
    channels_last: bool = False

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A loader batch (uint8 pixels) as the model's input on ``device``, in the training layout."""
        return images_to_device(images, device, channels_last=self.channels_last)


@dataclass
class EpochSetup:
    """What one training epoch needs besides the model and the data."""
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    precision: Precision
    n_old: int
    n_new: int
    grad_accum: int = 1
    log_interval: int = 10
    show_progress: bool = False
    epochs: int = 0  # epochs of the step, for "epoch e/E" in the log (0: unknown)
    hooks: object = None  # the method's per-batch hook (``compose_batch(TrainInputs) -> TrainInputs``); None = none
    after_update: Callable[[], None] | None = None  # after every optimiser update (e.g. SSUL's validation); must
    # leave the model in training mode
    clip_grad: float = 0.0  # > 0: the L2 norm of every gradient of the optimiser together is clipped to this


def split_item(batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A loader batch ``(images, labels)`` or ``(images, labels, aux dict)`` as three parts."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    images, labels = batch
    return images, labels, {}


def forward_old(model_old, images: torch.Tensor, needs_features: bool, precision: Precision):
    """Old model output in no-grad and in the training precision; (None, None) at step 0."""
    if model_old is None:
        return None, None
    with torch.no_grad(), precision.autocast():
        logits, extras = model_old(images, ret_intermediate=needs_features)
    return logits, extras


def _compute_losses(model, model_old, inputs: TrainInputs, setup: EpochSetup) -> dict[str, torch.Tensor]:
    criterion = setup.criterion
    if setup.hooks is not None:
        inputs = setup.hooks.compose_batch(inputs)
    images, labels = inputs.images, inputs.labels
    logits_old, extras_old = forward_old(model_old, images, criterion.needs_features, setup.precision)
    with setup.precision.autocast():
        logits, extras = model(images, ret_intermediate=criterion.needs_features, **inputs.forward_kwargs)
        if setup.precision.channels_last:  # losses see the standard layout (CPU nll_loss backward needs it)
            logits = logits.contiguous()
            logits_old = logits_old.contiguous() if logits_old is not None else None
        batch = Batch(images=images, labels=labels, logits=logits, extras=extras, logits_old=logits_old,
                      extras_old=extras_old, n_old=setup.n_old, n_new=setup.n_new, original_labels=labels,
                      aux=inputs.aux)
        return criterion(batch)


def unwrap(model):
    """The plain module under ``torch.compile`` and DDP wrappers (terms key their statistics by parameter name)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile: parameter names would start with "_orig_mod."
    return getattr(model, "module", model)


def _uses_after_backward(criterion) -> bool:
    """Whether a term overrides ``LossTerm.after_backward`` (unknown criterion types: assume it does)."""
    terms = getattr(criterion, "terms", None)
    if terms is None:
        return True
    return any(type(t).after_backward is not LossTerm.after_backward for t in terms)


RERUN_HINT = ("the last good checkpoint is kept; rerun with a lower --lr (the step continues from its last in-step "
              "checkpoint with the new lr) or add --no_auto_resume to start the step over; also check the data or try "
              "--amp off")


def _check_finite(sums: dict[str, torch.Tensor], window: list, where: str, n_iter: int,
                  model: torch.nn.Module | None = None) -> None:
    """``window``: (iteration, loss terms) since the last check; reports the first non-finite iteration in it. Then
    the weights: an update from a finite loss can still make them NaN/inf (found here, before any checkpoint)."""
    values = {k: float(v) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in values.values()):
        it, last = next(((i, t) for i, t in window if not all(math.isfinite(float(v)) for v in t.values())),
                        window[-1])
        terms = ", ".join(f"{k}={float(v):.6g}" for k, v in last.items())
        raise NonFiniteLoss(f"non-finite loss at {where}, iteration {it + 1}/{n_iter}: {terms}; "
                            + RERUN_HINT)
    if model is None:
        return
    keys, flags = finite_flags(model.state_dict())
    if not bool(flags.all()):  # the one host sync of the weight check, at log lines only
        bad = keys[int((~flags).nonzero()[0])]
        last_it = window[-1][0] + 1 if window else n_iter
        raise NonFiniteLoss(f"non-finite weights at {where}, by iteration {last_it}/{n_iter} ({bad} "
                            "holds NaN or inf after an update from a finite loss); " + RERUN_HINT)


def train_one_epoch(model, model_old, loader, setup: EpochSetup, *, step: int, epoch: int, board=None,
                    device: torch.device) -> dict[str, float]:
    """Train for one epoch; returns the mean of every loss term over the epoch (all ranks)."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    window: list = []  # (iteration, terms) since the last finiteness check (checked with the log, no extra syncs)
    n_iter = len(loader)
    where = epoch_label(step, epoch, setup.epochs)
    setup.optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(loader, enabled=setup.show_progress, desc=where, total=n_iter)
    start = time.perf_counter()
    for it, item in enumerate(bar if bar is not None else loader):
        images, labels, aux = split_item(item)
        inputs = TrainInputs(setup.precision.images(images, device), labels_to_device(labels, device),
                             {k: v.to(device, non_blocking=True) for k, v in aux.items()})
        lr = setup.optimizer.param_groups[0]["lr"]  # the lr this iteration trains with (logged below)
        boundary = (it + 1) % setup.grad_accum == 0 or it + 1 == n_iter
        sync = model.no_sync() if (not boundary and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            losses = _compute_losses(model, model_old, inputs, setup)
            total = sum(losses.values())
            setup.scaler.scale(total / setup.grad_accum).backward()
        if boundary:
            # get_scale() synchronises with the device: only ask for it when a term uses after_backward
            scale = setup.scaler.get_scale() if setup.scaler.is_enabled() and _uses_after_backward(
                setup.criterion) else 1.0
            extra = setup.criterion.after_backward(unwrap(model), grad_scale=scale)
            if extra:  # reference order: statistics from the task-loss gradients, then the penalty's own backward
                setup.scaler.scale(sum(extra.values())).backward()
                losses = {**losses, **extra}
            if setup.clip_grad > 0:  # on the true gradients; no host sync (the norm stays on the device)
                setup.scaler.unscale_(setup.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in setup.optimizer.param_groups for p in g["params"]],
                                               setup.clip_grad)
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
            setup.optimizer.zero_grad(set_to_none=True)
            setup.scheduler.step()
            if setup.after_update is not None:  # it leaves the model in training mode
                setup.after_update()
        last = {k: v.detach() for k, v in losses.items()}
        window.append((it, last))
        for k, v in last.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.float()
        if (it + 1) % setup.log_interval == 0 or it + 1 == n_iter:
            _check_finite(sums, window, where, n_iter, unwrap(model))
            window = []
            _log_iteration(board, last, lr, where, step, epoch, it, n_iter, time.perf_counter() - start,
                           file_only=bar is not None)
    return _epoch_means(sums, n_iter, device)


def epoch_label(step: int, epoch: int, epochs: int) -> str:
    """``step 0 epoch 3/30`` (epochs counted from 1 for people; ``epoch`` is the 0-based index)."""
    return f"step {step} epoch {epoch + 1}/{epochs}" if epochs else f"step {step} epoch {epoch + 1}"


def _log_iteration(board, last, lr: float, where: str, step, epoch, it, n_iter, elapsed: float,
                   file_only: bool = False) -> None:
    text = " ".join(f"{k}={float(v):.4f}" for k, v in last.items())
    log.info("%s iter %d/%d lr %.6f %s (%s elapsed, epoch ETA %s)", where, it + 1, n_iter, lr, text,
             duration(elapsed), eta(elapsed, it + 1, n_iter), extra={"file_only": file_only and it + 1 < n_iter})
    if board is not None:
        x = epoch * n_iter + it
        board.scalar(f"Loss/{step}", float(sum(last.values())), x)
        for k, v in last.items():
            board.scalar(f"{k}/{step}", float(v), x)


def _epoch_means(sums: dict[str, torch.Tensor], n_iter: int, device) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys]).to(torch.float64)
    count = torch.tensor([float(n_iter)], dtype=torch.float64, device=packed.device)
    packed = all_reduce_sum(torch.cat([packed, count]))
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}


@torch.no_grad()
def evaluate(model, loader, *, n_classes: int, device: torch.device, precision: Precision,
             show_progress: bool = False, sample_hook: Callable | None = None,
             predict: Callable | None = None, what: str = "evaluation") -> ConfusionMatrix:
    """Confusion matrix over ``loader``, accumulated on the device and reduced across ranks once; ``predict`` maps
    the logits to the scores whose argmax is the prediction (the method's ``predict``; None: the logits)."""
    model.eval()
    cm = ConfusionMatrix(n_classes, device)
    for i, item in enumerate(track(loader, f"{what} (batches)", bar=show_progress)):
        images, labels, _ = split_item(item)
        images = precision.images(images, device)
        labels = labels_to_device(labels, device)
        with precision.autocast():
            logits, _ = model(images)
        if predict is not None:
            logits = predict(logits)
        pred = logits.argmax(dim=1)
        cm.update(pred, labels)
        if sample_hook is not None:
            sample_hook(i, images, labels, pred)
    return cm.reduce()
