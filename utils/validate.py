"""Checks made before anything is trained or written: each failure is one line saying what, where and how to fix."""
from __future__ import annotations

import os
import tempfile

from utils.errors import UserError


def _check_writable(folder: str, flag: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {folder} ({exc.strerror}): choose another folder with {flag}") from exc


def _check_protocol(cfg) -> None:
    from dataset import READERS
    from dataset.tasks import num_steps

    if cfg.dataset not in READERS:
        raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(READERS))}")
    n = num_steps(cfg.dataset, cfg.task)
    bad = [s for s in cfg.step if not 0 <= s < n]
    if bad:
        raise UserError(f"--step {bad[0]} is outside task {cfg.task} of {cfg.dataset}, which has steps 0..{n - 1}")
    if cfg.no_mask:
        raise UserError("--no_mask is not supported (the reference hit 'assert False' for VOC and Cityscapes); "
                        "use --data_masking current+old to keep old-class labels")
    if cfg.data_masking == "all":
        raise UserError("--data_masking all is not implemented (neither in the reference); use current, "
                        "current+old or new")
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.grad_accum < 1:
        raise UserError("--batch_size, --epochs and --grad_accum must be at least 1")


def _check_checkpoints(cfg) -> None:
    from utils.builders import ckpt_path, classes_for_step, previous_ckpt_path
    from utils.checkpoint import check_class_layout, model_state, safe_load

    first = cfg.step[0]
    if first > 0 and not cfg.test:
        path = previous_ckpt_path(cfg, first, first_step_of_call=True)
        if not os.path.isfile(path):
            raise UserError(f"previous-step checkpoint not found: {path}; run step {first - 1} first "
                            f"(python run.py ... --step {first - 1}) or give it with --step_ckpt")
        check_class_layout(model_state(safe_load(path, "previous-step checkpoint"), path),
                           classes_for_step(cfg, first - 1), path)
    for step in cfg.step:
        if cfg.test and not cfg.ckpt and not os.path.isfile(ckpt_path(cfg, step)):
            raise UserError(f"--test: checkpoint of step {step} not found: {ckpt_path(cfg, step)}")
        if not cfg.test and not cfg.overwrite and os.path.isfile(ckpt_path(cfg, step)):
            raise UserError(f"step {step} is already trained: {ckpt_path(cfg, step)} exists; pass --overwrite to "
                            "train it again or --test to evaluate it")


def validate_run(cfg) -> None:
    """Everything that can be checked before training starts."""
    from methods import check_supported
    from utils.config import step_lrs

    _check_protocol(cfg)
    step_lrs(cfg)
    check_supported(cfg)
    if cfg.att and not 0 < cfg.att <= 100:
        raise UserError(f"--att {cfg.att} is outside (0, 100]: it is the percentage of channels to transfer")
    from dataset import READERS

    READERS[cfg.dataset](cfg.data_root, "train")
    READERS[cfg.dataset](cfg.data_root, "val")
    _check_checkpoints(cfg)
    if not cfg.test:
        _check_writable(cfg.checkpoint, "--checkpoint")
    _check_writable(cfg.results_dir, "--results_dir")
