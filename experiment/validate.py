"""Checks made before anything is trained or written: each failure is one line saying what, where and how to fix."""
from __future__ import annotations

import errno
import os
import tempfile

from dataset.readers import READERS
from dataset.tasks import classes_per_step, is_domain_incremental, num_steps
from experiment.builders import check_model_flags, ckpt_path, heads_for_step, pretrained_path, previous_ckpt_path
from experiment.config import step_lrs
from methods import build_method
from methods.awt import channels_path, classifier_init_plan, load_mask, resolve_per_class
from utils.checkpoint import (check_class_layout, check_resumable, classifier_weights, model_state, nonfinite_entry,
                              partial_ckpt_path, safe_load)
from utils.errors import UserError
from utils.io import free_space


def check_writable(folder: str, flag: str) -> None:
    """Probe the folder (or its nearest existing parent) without creating anything that stays; a full disk is named
    with its free space."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=probe) as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserError(f"no space left to write in {folder} ({free_space(probe)} at {probe}): free space or "
                            f"choose another folder with {flag}") from exc
        raise UserError(f"cannot write to {folder} ({exc.strerror} at {probe}): choose another folder with "
                        f"{flag}") from exc


def _check_data_root(cfg) -> None:
    root = str(cfg.data_root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--data_root {root!r} is a file, not a folder: point it to the dataset folder")
    if os.path.isdir(root) and not os.listdir(root):
        raise UserError(f"data root {root!r} is an empty folder: download the dataset there, point --data_root to it "
                        f"or {READERS[cfg.dataset].hint(root)}")
    READERS[cfg.dataset](root, "train")
    READERS[cfg.dataset](root, "val")


def _check_resume(cfg) -> None:
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


def _check_channel_masks(cfg, channels: int) -> None:
    """An AWT channel mask that already exists must fit the model (it is loaded, not recomputed)."""
    plan = classifier_init_plan(cfg)
    if cfg.test or not plan or plan["mask_source"] != "attribution":
        return
    for step in cfg.step:
        if step < 1:
            continue
        per_class = resolve_per_class(cfg, step)
        path = channels_path(cfg, step, per_class=per_class)
        if os.path.isfile(path):
            load_mask(path, channels, int(classes_per_step(cfg.dataset, cfg.task, step)[-1]) if per_class else None)


def _check_protocol(cfg) -> None:
    if cfg.dataset not in READERS:
        raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(READERS))}")
    n = num_steps(cfg.dataset, cfg.task)
    bad = [s for s in cfg.step if not 0 <= s < n]
    if bad:
        raise UserError(f"--step {bad[0]} is outside task {cfg.task} of {cfg.dataset}, which has steps 0..{n - 1}")
    if cfg.no_mask:
        raise UserError("--no_mask is not supported (the reference hit 'assert False' for VOC and Cityscapes); "
                        "use --data_masking current+old to keep old-class labels")
    for flag in ("ignore_test_bg", "disable_background"):
        if getattr(cfg, flag):
            raise UserError(f"--{flag} is not implemented (a PLOP-era ablation no published AWT script uses); "
                            "remove it")
    if cfg.data_masking == "all":
        raise UserError("--data_masking all is not implemented (neither in the reference); use current, "
                        "current+old or new")
    if len(set(cfg.step)) != len(cfg.step) or list(cfg.step) != sorted(cfg.step):
        raise UserError(f"--step {' '.join(map(str, cfg.step))}: give each step once, in increasing order "
                        "(e.g. --step 0 1 2)")
    if cfg.batch_size == 1 and not cfg.test and not cfg.fix_bn:
        raise UserError("--batch_size 1 trains batch norm on one image per process, whose image-pooling branch has a "
                        "single value per channel: use --batch_size 2 or more (--grad_accum keeps the effective batch) "
                        "or --fix_bn")
    if is_domain_incremental(cfg.dataset):
        _check_domain_flags(cfg)


# Flags that act on the classes a step adds (default values): meaningless when steps add domains. The reference ran
# them with every class "old" (UNCE then has no loss at all); its domain-incremental scripts use none of them.
_CLASS_STEP_FLAGS = {"unce": False, "unkd": False, "pseudo": None, "icarl": False, "init_balanced": False,
                     "orig_init": False, "att": 0.0, "random_channels": False}


def _check_domain_flags(cfg) -> None:
    bad = [flag for flag, default in _CLASS_STEP_FLAGS.items() if getattr(cfg, flag) != default]
    if bad:
        origin = f" (set by --method {cfg.method})" if cfg.method else ""
        raise UserError(f"--{bad[0]}{origin} works on the classes a step adds, but {cfg.dataset} adds cities and keeps "
                        "its 19 classes; use --method FT with --pod/--loss_kd as the published domain-incremental "
                        "scripts do (scripts/cityscapes_domain/)")


def _check_checkpoints(cfg) -> int:
    """Returns the classifier-input channels of the previous-step model (256 when none is loaded)."""
    first, channels = cfg.step[0], 256
    if first > 0 and not cfg.test:
        path = previous_ckpt_path(cfg, first, first_step_of_call=True)
        if not os.path.isfile(path):
            raise UserError(f"previous-step checkpoint not found: {path}; run step {first - 1} first "
                            f"(python run.py ... --step {first - 1}) or give it with --step_ckpt")
        ckpt = safe_load(path, "previous-step checkpoint")
        check_model_flags(ckpt, cfg, path, "previous-step checkpoint")
        state = model_state(ckpt, path)
        check_class_layout(state, heads_for_step(cfg, first - 1), path)
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


def validate_run(cfg) -> None:
    """Everything that can be checked before training starts."""
    _check_protocol(cfg)
    step_lrs(cfg)
    build_method(cfg)  # the plugins' own checks
    if cfg.att and not 0 < cfg.att <= 100:
        raise UserError(f"--att {cfg.att} is outside (0, 100]: it is the percentage of channels to transfer")
    if 0 in cfg.step and not cfg.test:
        pretrained_path(cfg)  # a missing ImageNet file is an error before the datasets are built
    _check_data_root(cfg)
    _check_resume(cfg)
    _check_channel_masks(cfg, _check_checkpoints(cfg))
    for folder, flag, needed in ((cfg.checkpoint, "--checkpoint", not cfg.test), (cfg.results_dir, "--results_dir", True),
                                 (cfg.logdir, "--logdir", True), (cfg.cache_root, "--cache_root", True),
                                 (cfg.channels_dir, "--channels_dir", _needs_masks(cfg))):
        if needed:
            check_writable(folder, flag)


def _needs_masks(cfg) -> bool:
    plan = classifier_init_plan(cfg)
    return bool(plan and plan["mask_source"] == "attribution" and not cfg.test)
