"""Checks made before anything is trained or written: each failure is one line saying what, where and how to fix."""
from __future__ import annotations

import errno
import os
import tempfile

from dataset.readers import READERS
from dataset.incremental import source_roots
from dataset.tasks import CROSS_DATASETS, classes_per_step, data_sources, dataset_names, num_steps, score_groups
from experiment.builders import check_model, model_spec, pretrained_path
from experiment.checkpoints import check_resume_request, check_step_checkpoints
from experiment.config import step_lrs
from methods import MethodStack
from methods.awt import channels_path, load_mask, resolve_per_class
from utils.errors import UserError
from utils.io import free_space


def check_writable(folder: str, flag: str) -> None:
    """Probe the folder (or its nearest existing parent) without creating anything that stays; a full disk is named
    with its free space."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        if os.path.islink(probe):  # exists() is False for a link whose target is missing or that loops
            raise UserError(f"{flag} {folder}: {probe} is a symbolic link to {_link_target(probe)}, which "
                            "does not exist or loops; fix or remove the link, or choose another folder with "
                            f"{flag}")
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


def _link_target(path: str) -> str:
    try:
        return repr(os.readlink(path))
    except OSError:
        return "an unreadable target"


def _check_data_root(cfg) -> None:
    root = str(cfg.data_root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--data_root {root!r} is a file, not a folder: point it to the dataset folder")
    readers = data_sources(cfg.dataset)
    roots = source_roots(cfg.dataset, root, cfg.data_roots)
    if os.path.isdir(root) and not os.listdir(root):
        hint = READERS[readers[next(iter(readers))]].hint(root)
        raise UserError(f"data root {root!r} is an empty folder: download the dataset there, point --data_root to it "
                        f"or {hint}")
    for source, reader in readers.items():
        READERS[reader](roots[source], "train")
        READERS[reader](roots[source], "val")


def _check_channel_masks(cfg, channels: int, method: MethodStack) -> None:
    """An AWT channel mask that already exists must fit the model (it is loaded, not recomputed)."""
    if cfg.test or not _needs_masks(cfg, method):
        return
    for step in cfg.step:
        if step < 1:
            continue
        per_class = resolve_per_class(cfg, step)
        path = channels_path(cfg, step, per_class=per_class)
        if os.path.isfile(path):
            load_mask(path, channels, int(classes_per_step(cfg.dataset, cfg.task, step)[-1]) if per_class else None)


def _check_protocol(cfg) -> None:
    if cfg.dataset not in dataset_names():
        raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(sorted(dataset_names()))}")
    cross = CROSS_DATASETS.get(cfg.dataset)
    if cross is not None and cross.disjoint and cfg.overlap:
        raise UserError(f"--dataset {cfg.dataset} uses the disjoint filter by definition (a step's images hold no "
                        "class of a later step: step 0 of coco-voc has no VOC pixel); drop --overlap")
    n = num_steps(cfg.dataset, cfg.task)
    bad = [s for s in cfg.step if not 0 <= s < n]
    if bad:
        raise UserError(f"--step {bad[0]} is outside task {cfg.task} of {cfg.dataset}, which has steps 0..{n - 1}")
    if not cfg.weakly:
        for flag in ("img_labels", "weak_allow_single", "weak_old_labels"):
            if getattr(cfg, flag):
                raise UserError(f"--{flag} sets how weak steps read their image labels; add --weakly or drop it")
        if cfg.img_labels_from != "image":
            raise UserError("--img_labels_from sets how weak steps read their image labels; add --weakly or drop it")
    elif cfg.img_labels and cfg.img_labels_from == "crop":
        raise UserError("--img_labels_from crop lists the classes present in each crop from the label files, and "
                        "--img_labels gives image labels without them: drop one")
    elif cfg.cross_val:
        raise UserError("--cross_val validates on training images, whose pixel labels a weak step (--weakly) must "
                        "not read: drop --cross_val")
    if cfg.novel_has_mask and score_groups(cfg.dataset, cfg.task, 0) is None:
        raise UserError(f"--novel_has_mask gives a weak-shot task's novel classes pixel labels; task {cfg.task} of "
                        f"{cfg.dataset} is not one (choose a ws* task or drop it)")
    if cfg.val_every_iters and not cfg.select_best_on_val:
        raise UserError(f"--val_every_iters {cfg.val_every_iters} validates for the model selection only; add "
                        "--select_best_on_val (or drop --val_every_iters)")
    if cfg.no_mask and not cfg.weakly:
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


def validate_run(cfg, method: MethodStack) -> None:
    """Everything that can be checked before training starts (``method``: the call's stack, whose plugins checked
    their flags when it was built)."""
    _check_protocol(cfg)
    step_lrs(cfg)
    check_model(cfg, method)
    if 0 in cfg.step and not cfg.test:
        pretrained_path(cfg, model_spec(cfg, 0, method))  # a missing ImageNet file is an error before the datasets
    _check_data_root(cfg)
    check_resume_request(cfg)
    _check_channel_masks(cfg, check_step_checkpoints(cfg, method), method)
    for folder, flag, needed in ((cfg.checkpoint, "--checkpoint", not cfg.test), (cfg.results_dir, "--results_dir", True),
                                 (cfg.logdir, "--logdir", True), (cfg.cache_root, "--cache_root", True),
                                 (cfg.channels_dir, "--channels_dir", _needs_masks(cfg, method) and not cfg.test)):
        if needed:
            check_writable(folder, flag)


def _needs_masks(cfg, method: MethodStack) -> bool:
    """Whether the run's init plan transfers on attributed channels (AWT's masks)."""
    transfer = method.init_plan.transfer
    return isinstance(transfer, dict) and transfer.get("mask_source") == "attribution"
