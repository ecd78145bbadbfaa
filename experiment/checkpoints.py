"""Checkpoint, resume and compatibility policy: where a step's checkpoints live, whether a file's weights fit the
model of this run and may be used (model flags, classes per step, keys, shapes, finite values), what a checkpoint
holds, and how an interrupted step continues. ``utils/checkpoint.py`` reads and writes the files; run.py keeps the
step flow and asks this module.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from experiment.argparser import get_argparser
from experiment.builders import build_model, heads_for_step
from experiment.config import dump, to_dict
from methods import MethodStack
from modules.heads import final_layer
from utils.checkpoint import (check_class_layout, check_resumable, classifier_weights, model_state, nonfinite_entry,
                              partial_ckpt_path, safe_load, step_ckpt_path)
from utils.errors import UserError
from utils.flags import resume_free_dests

log = logging.getLogger(__name__)
VERSION = 1


# ------------------------------------------------------------------------------------------------ paths
def ckpt_path(cfg, step: int) -> str:
    return step_ckpt_path(cfg.checkpoint, cfg.task, cfg.dataset, cfg.name, step)


def previous_ckpt_path(cfg, step: int, *, first_step_of_call: bool) -> str:
    """Checkpoint of step - 1: ``--step_ckpt`` for the first step of the call, else the standard path."""
    if cfg.step_ckpt and first_step_of_call:
        return cfg.step_ckpt
    return ckpt_path(cfg, step - 1)


# Flags that change the model's layout; a checkpoint that records other values does not fit (named before loading).
MODEL_FLAGS = ("backbone", "norm_act", "output_stride", "aspp_rates")
_NONFINITE_ADVICE = {
    "previous-step checkpoint": "retrain the previous step (--overwrite) or give another --step_ckpt",
    "step checkpoint": "no result is computed from it; retrain the step (--overwrite)",
}


def _saved_config(ckpt) -> dict:
    try:
        return json.loads(ckpt["config"]) if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), str) else {}
    except ValueError:
        return {}


def _family_of(state: dict) -> str:
    """A guess of the backbone a state dict was built with, from its keys (for messages)."""
    tv = [k for k in state if k.startswith("body.layer")]
    if tv:
        blocks = tuple(1 + max(int(k.split(".")[2]) for k in tv if k.startswith(f"body.layer{i}."))
                       for i in range(1, 5) if any(k.startswith(f"body.layer{i}.") for k in tv))
        return {(2, 2, 2, 2): "tv_resnet18", (3, 4, 6, 3): "tv_resnet50", (3, 4, 23, 3): "tv_resnet101"}.get(
            blocks, "a torchvision-layout ResNet")
    blocks = tuple(sum(1 for k in state if k.startswith(f"body.mod{i}.block") and k.endswith("convs.conv1.weight"))
                   for i in range(2, 6))
    return {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}.get(
        blocks, "an unknown backbone")


def check_model_flags(ckpt, cfg, path: str, what: str) -> None:
    """The model flags the checkpoint's stored configuration records must be this run's (no model needed)."""
    saved = _saved_config(ckpt)
    for flag in MODEL_FLAGS:
        ours = getattr(cfg, flag, None)
        ours = list(ours) if isinstance(ours, tuple) else ours
        if flag in saved and saved[flag] != ours:
            theirs, mine = _flag_text(saved[flag]), _flag_text(ours)
            hint = f"pass --{flag} {theirs}" if saved[flag] is not None else f"drop --{flag}"
            raise UserError(f"{what} {path} was trained with --{flag} {theirs}, this run builds "
                            f"--{flag} {mine}: {hint} or give another checkpoint")


def _flag_text(value) -> str:
    if value is None:
        return "(default)"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def is_bn_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: a step counter that no forward reads (momentum is set). inplace-abn >= 1.1
    writes it for its ABN layers and our pure-PyTorch ABN has none, so a key check ignores it either way."""
    return key.endswith("num_batches_tracked")


def load_checked_state(model, state: dict) -> None:
    """Load a state that :func:`check_compatible` accepted: BatchNorm counters the model lacks are dropped, those
    the checkpoint lacks keep the model's value."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own or not is_bn_counter(k)}, strict=False)


def check_compatible(ckpt, state: dict, model, cfg, path: str, what: str, strict: bool = True) -> None:
    """One line naming what differs between a checkpoint and the model this run builds, before loading it: the
    model flags the checkpoint records, the classes per step, then keys (BatchNorm counters aside) and shapes."""
    if cfg is not None:
        check_model_flags(ckpt, cfg, path, what)
    check_class_layout(state, [int(final_layer(m).weight.shape[0]) for m in model.cls], path)
    own = model.state_dict()
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state and not is_bn_counter(k)] if strict else []
    unexpected = [k for k in state if k not in own and not is_bn_counter(k)] if strict else []
    if shapes or missing or unexpected:
        parts = [f"{name} {len(keys)} (first {keys[0]})" for name, keys in
                 (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)) if keys]
        here = f"--backbone {cfg.backbone} --norm_act {cfg.norm_act}" if cfg is not None else "this model"
        raise UserError(f"{what} {path} does not fit the model of this run ({here}): {'; '.join(parts)}; it looks "
                        f"like a {_family_of(state)} checkpoint: check --backbone, --norm_act and --method")


def load_weights(model, path: str, *, strict: bool = True, what: str = "checkpoint", cfg=None) -> dict:
    """Load a step checkpoint's weights into ``model`` after checking that they fit it and are finite; returns the
    whole checkpoint dict."""
    ckpt = safe_load(path, what)
    state = model_state(ckpt, path)
    check_compatible(ckpt, state, model, cfg, path, what, strict)
    bad = nonfinite_entry(state)
    if bad is not None:
        advice = _NONFINITE_ADVICE.get(what, "retrain it")
        raise UserError(f"{what} {path} holds NaN or inf ({bad}), written before this check existed: {advice}")
    load_checked_state(model, state)
    return ckpt if isinstance(ckpt, dict) else {"model_state": state}


def load_previous_step(cfg, step: int, device, *, method: MethodStack, first_step_of_call: bool = True):
    """(frozen model of step - 1 in eval mode, prepared by the method as the step's teacher; its checkpoint dict).
    A missing file is an error, never a random model."""
    path = previous_ckpt_path(cfg, step, first_step_of_call=first_step_of_call)
    if not os.path.isfile(path):
        raise UserError(f"previous-step checkpoint not found: {path}; run step {step - 1} first "
                        f"(python run.py ... --step {step - 1}) or pass --step_ckpt")
    model_old = build_model(cfg, step - 1, pretrained=False, method=method)
    ckpt = load_weights(model_old, path, strict=cfg.strict_weights, what="previous-step checkpoint", cfg=cfg)
    model_old.to(device).eval()
    for p in model_old.parameters():
        p.requires_grad_(False)
    method.prepare_old_model(model_old, step)
    return model_old, ckpt


def load_old_model(cfg, step: int, device, *, method: MethodStack, first_step_of_call: bool = True):
    """The frozen model of step - 1 in eval mode."""
    return load_previous_step(cfg, step, device, first_step_of_call=first_step_of_call, method=method)[0]


def load_previous_into(model, model_old, step: int) -> None:
    """Copy the previous step's weights into the new model; only the new classifier may stay unloaded."""
    missing, unexpected = model.load_state_dict(model_old.state_dict(), strict=False)
    new_prefix = f"cls.{len(model.cls) - 1}."
    if unexpected or any(not k.startswith(new_prefix) for k in missing):
        raise UserError(f"previous-step model does not fit step {step}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")


# ------------------------------------------------------------------------------------------------ before a call
def check_resume_request(cfg) -> None:
    """--ckpt, --resume and --no_auto_resume make sense together, and a --ckpt file can continue (or be tested
    by) this run: checked before any dataset cache is built, so a broken file stops the call with nothing written."""
    if cfg.ckpt and len(cfg.step) > 1:
        raise UserError(f"--ckpt names the checkpoint of one step but --step has {len(cfg.step)} values; run the "
                        "step it belongs to on its own")
    if cfg.ckpt and not os.path.isfile(cfg.ckpt):
        raise UserError(f"--ckpt {cfg.ckpt} does not exist; give the path of a checkpoint of step {cfg.step[0]}")
    if cfg.ckpt:  # before any dataset cache is built: a broken file stops the call with nothing written
        what = "step checkpoint" if cfg.test else "resume checkpoint"
        ckpt = safe_load(cfg.ckpt, what)
        if not cfg.test:
            check_resumable(ckpt, cfg.ckpt, "give another --ckpt")
        check_model_flags(ckpt, cfg, cfg.ckpt, what)
        bad = nonfinite_entry(model_state(ckpt, cfg.ckpt))
        if bad is not None:
            fix = "no result is computed from it; retrain the step" if cfg.test else "it cannot be continued; give " \
                "another --ckpt or pass --no_auto_resume without --ckpt to start the step over"
            raise UserError(f"{what} {cfg.ckpt} holds NaN or inf ({bad}): {fix}")
    if cfg.resume and not cfg.ckpt and not cfg.test:
        partial = partial_ckpt_path(ckpt_path(cfg, cfg.step[0]))
        if cfg.no_auto_resume:
            raise UserError("--resume and --no_auto_resume contradict each other; pass one of them")
        if not os.path.isfile(partial) and os.path.isfile(ckpt_path(cfg, cfg.step[0])):
            raise UserError(f"--resume: step {cfg.step[0]} has finished, {ckpt_path(cfg, cfg.step[0])} exists; drop "
                            "--resume (use --test to evaluate it, --overwrite to train it again)")
        if not os.path.isfile(partial):
            raise UserError(f"--resume: nothing to resume for step {cfg.step[0]}, {partial} does not exist (the step "
                            "was not interrupted after a checkpoint, or other --checkpoint/--name/--task); drop "
                            "--resume to start the step")


def check_step_checkpoints(cfg, method: MethodStack) -> int:
    """The previous-step checkpoint of the call's first step exists, fits the classes per step of the method's layout
    and is finite; with --test every step's checkpoint exists. Returns the classifier-input channels of the
    previous-step model (256 when none is loaded)."""
    first, channels = cfg.step[0], 256
    if first > 0 and not cfg.test:
        path = previous_ckpt_path(cfg, first, first_step_of_call=True)
        if not os.path.isfile(path):
            raise UserError(f"previous-step checkpoint not found: {path}; run step {first - 1} first "
                            f"(python run.py ... --step {first - 1}) or give it with --step_ckpt")
        ckpt = safe_load(path, "previous-step checkpoint")
        check_model_flags(ckpt, cfg, path, "previous-step checkpoint")
        state = model_state(ckpt, path)
        check_class_layout(state, heads_for_step(cfg, first - 1, method), path)
        bad = nonfinite_entry(state)
        if bad is not None:
            raise UserError(f"previous-step checkpoint {path} holds NaN or inf ({bad}): step {first} cannot start "
                            f"from it; retrain step {first - 1} (--step {first - 1} --overwrite) or give another "
                            "--step_ckpt")
        channels = int(classifier_weights(state)[0].shape[1])
    for step in cfg.step:
        if cfg.test and not cfg.ckpt and not os.path.isfile(ckpt_path(cfg, step)):
            raise UserError(f"--test: checkpoint of step {step} not found: {ckpt_path(cfg, step)}")
    return channels


# ------------------------------------------------------------------------------------------------ resume
def _differences(saved: dict, cfg, skip: frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """``(flag, there, now)`` for the training flags (not the resume-free ones) in which a checkpoint's stored
    configuration differs from this run's; flags a newer version added are not compared."""
    current = json.loads(json.dumps(to_dict(cfg), sort_keys=True, default=str))
    free = resume_free_dests(get_argparser()) | skip  # declared where each flag is defined (utils.flags.declare)
    return [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current))
            if k not in free and saved[k] != current[k]]


def _shown(diff: list[tuple[str, Any, Any]], most: int = 3) -> str:
    text = ", ".join(f"--{k} {there!r} there, {now!r} now" for k, there, now in diff[:most])
    return text + (f" and {len(diff) - most} more" if len(diff) > most else "")


def training_differences(ckpt: Any, cfg, lr: float) -> str:
    """The training flags in which this call differs from the one that trained a finished step's checkpoint (its
    own lr compared with this call's lr of the step), as one phrase; '' when none or unknown (reference files)."""
    saved = _saved_config(ckpt)
    if not saved:
        return ""
    diff = _differences(saved, cfg, skip=frozenset({"lr", "step"}))
    there = saved_step_lr(ckpt, cfg) if isinstance(ckpt, dict) else None
    if there is not None and there != lr:
        diff.insert(0, ("lr", there, lr))
    return _shown(diff)


def check_resume_config(ckpt: Any, cfg, path: str) -> None:
    """Refuse to resume from an in-step checkpoint written with different training flags (e.g. --batch_size)."""
    diff = _differences(_saved_config(ckpt), cfg)
    if diff:
        raise UserError(f"in-step checkpoint {path} was written with other settings ({_shown(diff)}); rerun with "
                        "the same flags to resume, or pass --no_auto_resume to start the step over")


def checkpoint_content(cfg, model, setup, epoch: int, best_score: float, method: MethodStack,
                       step_lr: float | None = None, *, record: dict | None = None, final: bool = False) -> dict:
    """The reference keys plus what an exact resume needs. ``final``: the step's checkpoint, which keeps only what
    the next step and evaluation read (weights, the terms' statistics, configuration, the run record): no
    optimiser, schedule, scaler or RNG state, which live in the in-step ``.partial.pth`` only."""
    trainer_state = {"regularizer": None, **setup.criterion.state_dict()}
    if methods_state := method.state_dict():
        trainer_state["methods"] = methods_state
    content = {"epoch": epoch, "model_state": model.state_dict(), "best_score": best_score,
               "trainer_state": trainer_state, "config": dump(cfg), "version": VERSION,
               **({"step_lr": step_lr} if step_lr is not None else {}),
               **({"run_record": record, "train_id": record["train_id"]} if record else {})}
    if not final:
        content.update(optimizer_state=setup.optimizer.state_dict(), scheduler_state=setup.scheduler.state_dict(),
                       scaler_state=setup.scaler.state_dict(), rng_state={"torch": torch.get_rng_state()})
    return content


def saved_step_lr(ckpt: dict, cfg) -> float | None:
    """The lr the checkpoint's step was trained with (``step_lr``; older files: from their stored configuration)."""
    if "step_lr" in ckpt:
        return float(ckpt["step_lr"])
    try:
        saved = json.loads(ckpt["config"])
        lrs = saved["lr"] * len(saved["step"]) if len(saved["lr"]) == 1 else saved["lr"]
        return float(dict(zip(saved["step"], lrs))[cfg.step[0] if cfg.ckpt else ckpt.get("step", cfg.step[0])])
    except (KeyError, TypeError, ValueError):
        return None


def apply_new_lr(setup, old: float | None, new: float, path: str) -> None:
    """Continue an interrupted step with a changed --lr: the schedule restarts from the new base lr at the epoch
    reached (momentum and the other optimiser state are kept)."""
    if old is None or old == new:
        return
    ratio = new / old
    for group in setup.optimizer.param_groups:
        group["lr"] *= ratio
        group["initial_lr"] = group.get("initial_lr", group["lr"]) * ratio
    setup.scheduler.base_lrs = [base * ratio for base in setup.scheduler.base_lrs]
    log.warning("--lr %g differs from the %g the in-step checkpoint %s was trained with: the step continues with the "
                "new lr (schedule rescaled, now %g); the checkpoint and the run record store %g", new, old, path,
                setup.optimizer.param_groups[0]["lr"], new)


def resume_source(cfg, final_path: str) -> str | None:
    """The in-step checkpoint the step will continue from (``--ckpt``, else its ``.partial.pth``), or None when it
    starts over. A plugin phase before training (NeST's pre-tuning) is skipped when there is one: that checkpoint
    holds the model after it."""
    path = cfg.ckpt or partial_ckpt_path(final_path)
    if not os.path.isfile(path) or (cfg.no_auto_resume and not cfg.ckpt):
        return None
    return path


def resume_if_possible(cfg, model, setup, final_path: str, method: MethodStack | None = None,
                       lr: float | None = None, record: dict | None = None) -> int:
    """Restore an interrupted step (``.partial.pth`` or ``--ckpt``); returns the epoch to start from. A changed
    ``lr`` is applied from there (``apply_new_lr``); any other changed training flag is refused. ``record`` (the
    run record of this step) takes over the interrupted training's ``train_id``: it is the same training."""
    path = resume_source(cfg, final_path)
    if path is None:
        if cfg.ckpt:  # --resume without an in-step checkpoint is refused up front (experiment/validate.py)
            raise UserError(f"nothing to resume: --ckpt {cfg.ckpt} does not exist")
        return 0
    restart = "pass --no_auto_resume to start the step over" if not cfg.ckpt else "give another --ckpt"
    ckpt = safe_load(path, "resume checkpoint", hint=f"; {restart}")
    check_resumable(ckpt, path, restart)
    check_resume_config(ckpt, cfg, path)
    state = model_state(ckpt, path)
    check_compatible(ckpt, state, model, cfg, path, "resume checkpoint")
    bad = nonfinite_entry(state)
    if bad is not None:
        raise UserError(f"resume checkpoint {path} holds NaN or inf ({bad}): it cannot be continued; {restart}")
    load_checked_state(model, state)
    setup.optimizer.load_state_dict(ckpt["optimizer_state"])
    setup.scheduler.load_state_dict(ckpt["scheduler_state"])
    if lr is not None:
        apply_new_lr(setup, saved_step_lr(ckpt, cfg), lr, path)
    if ckpt.get("scaler_state"):
        setup.scaler.load_state_dict(ckpt["scaler_state"])
    trainer_state = ckpt.get("trainer_state") or {}
    setup.criterion.load_state_dict(trainer_state)
    if method is not None:
        method.load_state_dict(trainer_state.get("methods") or {})
    if "rng_state" in ckpt:
        torch.set_rng_state(ckpt["rng_state"]["torch"])
    if record is not None and ckpt.get("train_id"):
        record["train_id"] = ckpt["train_id"]
    log.info("resuming step from %s after epoch %d/%d", path, ckpt["epoch"], cfg.epochs)
    return int(ckpt["epoch"])


def restored_selection(cfg, final_path: str) -> dict | None:
    """The best weights so far of an interrupted step (``--select_best_on_val``), from its in-step checkpoint."""
    path = partial_ckpt_path(final_path)
    if not cfg.select_best_on_val or cfg.no_auto_resume or not os.path.isfile(path):
        return None
    saved = safe_load(path, "resume checkpoint").get("selection")
    return saved if isinstance(saved, dict) and "state" in saved else None
