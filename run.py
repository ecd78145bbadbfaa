"""Train and test one or more incremental steps: ``python run.py --dataset voc --task 15-1 --step 0 1 ...``.

Runs on the CPU or one GPU without a launcher, and under ``torchrun --nproc_per_node=N`` with DDP.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import random
import shlex
import sys
import time
import uuid

import numpy as np
import torch

from dataset.readers import space_reader
from dataset.tasks import extra_test_sources, first_test_source, order, score_groups, test_sources
from experiment.builders import (build_model, build_step_datasets, classes_for_step, cpu_threads, data_kind,
                                 extra_test_sets, log_folder, norm_fallback_note, resolve_precision, select_device)
from experiment.checkpoints import (checkpoint_content, ckpt_path, load_previous_into, load_previous_step,
                                    load_weights, restored_selection, resume_if_possible,
                                    resume_source, training_differences)
from experiment.config import parse_config, step_lrs, to_dict
from experiment.recipes import Recipe, match
from experiment.validate import check_writable, validate_run
from methods import MethodStack, StepContext, build_method
from modules.norm import describe_norm_layers
from metrics.report import read_run, step_scores
from metrics.results import (csv_row, format_summary, read_rows, results_csv_path, summary_path, update_run_record,
                             upsert_row)
from metrics import summary
import train
from train import EpochSetup
from utils.checkpoint import nonfinite_in_model, partial_ckpt_path, safe_load, save_checkpoint
from utils.data import build_loader
from utils.dist import (barrier, cleanup, get_rank, get_world_size, init_distributed, is_distributed,
                        is_main_process, peer_failure_message)
from utils.errors import UserError, one_line
from utils.io import atomic_write_text, remove_stale_temporaries
from utils.lock import RunLock
from utils import logger
from utils.optim import build_optimizer, build_scheduler
from utils.progress import duration, eta, status
from utils.visualize import SampleCollector, index_to_class_lut

log = logging.getLogger("run")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loaders(cfg, step: int, device: torch.device, method: MethodStack):
    """Train, validation and test loaders of ``step`` and the unwrapped training dataset; evaluation batch =
    --batch_size on centre crops (default), 1 on full images with --crop_val (reference)."""
    datasets = build_step_datasets(cfg, step)
    train_ds, val_ds, test_ds = (method.wrap_dataset(split, ds, step)
                                 for split, ds in zip(("train", "val", "test"), datasets))
    per_process = len(train_ds) // get_world_size()
    if per_process < cfg.batch_size:
        raise UserError(f"step {step} of {cfg.dataset} {cfg.task} has {len(train_ds)} training images, "
                        f"{per_process} per process, fewer than --batch_size {cfg.batch_size}: lower --batch_size "
                        "or use a larger dataset")
    pin = device.type == "cuda"
    eval_bs = cfg.batch_size if cfg.crop_val else 1
    common = {"num_workers": cfg.num_workers, "seed": cfg.random_seed, "pin_memory": pin}
    tests = {"": test_ds, **{source: method.wrap_dataset("test", ds, step)
                             for source, ds in extra_test_sets(cfg, step).items()}}
    loaders = (build_loader(train_ds, batch_size=cfg.batch_size, train=True, **common),
               build_loader(val_ds, batch_size=eval_bs, train=False, **common),
               {source: build_loader(ds, batch_size=eval_bs, train=False, **common) for source, ds in tests.items()})
    return loaders, datasets[0]


def results_paths(cfg, step: int) -> dict[str, str]:
    """The results CSV of each test set of ``step``, ``{"": the run's CSV, source: ..._{name}@{source}.csv}``."""
    extra = extra_test_sources(cfg.dataset, step)
    return {test: results_csv_path(cfg.results_dir, cfg.date, cfg.dataset, cfg.task, cfg.name, test)
            for test in ["", *extra]}


def prepare_models(cfg, step: int, device: torch.device, first_step_of_call: bool, *, method: MethodStack,
                   ctx: StepContext | None = None):
    """The model of ``step`` (previous weights loaded, prepared and its new classifier initialised as the method's
    init plan says) and the frozen old model; returns ``(model, model_old, previous trainer_state)``. ``ctx``
    (optional) receives the models and is what the method's hooks see."""
    ctx = ctx or StepContext(step=step, classes=classes_for_step(cfg, step), model=None, device=device,
                             method=method)
    if step == 0:
        model, model_old, trainer_state = build_model(cfg, 0, pretrained=True, method=method).to(device), None, {}
    else:
        # new model first: its new classifier's default init is drawn right after the seed, as in the reference
        model = build_model(cfg, step, pretrained=False, method=method)
        model_old, prev = load_previous_step(cfg, step, device, first_step_of_call=first_step_of_call,
                                             method=method)
        load_previous_into(model, model_old, step)
        model.to(device)
        trainer_state = prev.get("trainer_state") or {}
    ctx.model, ctx.model_old, ctx.trainer_state = model, model_old, trainer_state
    method.prepare_model(ctx)
    if model_old is not None and len(model.cls) > len(model_old.cls):  # domain-incremental steps add no classifier
        method.init_new_classifier(ctx)
    return model, model_old, trainer_state


def configure_backends(cfg, device: torch.device) -> None:
    """cuDNN autotuning on CUDA (fixed input sizes), deterministic cuDNN kernels instead with --deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = bool(cfg.deterministic)


def wrap_for_training(cfg, model, device: torch.device):
    """Channels-last, DDP and torch.compile as asked; returns the module the training loop calls."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = model
    if get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def build_setup(cfg, step: int, lr: float, model, model_old, train_loader, trainer_state, precision, device, *,
                method: MethodStack, ctx: StepContext | None = None):
    """Optimiser, schedule, scaler and the criterion of this step; returns ``(EpochSetup, StepContext)``."""
    optimizer = build_optimizer(method.param_groups(model, lr, step), cfg, lr)
    iters = cfg.epochs * -(-len(train_loader) // cfg.grad_accum)
    scheduler = build_scheduler(optimizer, cfg, iters)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype is torch.float16)
    ctx = ctx or StepContext(step=step, classes=classes_for_step(cfg, step), model=model, method=method)
    ctx.model, ctx.model_old, ctx.device, ctx.train_loader = model, model_old, device, train_loader
    ctx.trainer_state, ctx.world_size, ctx.autocast = trainer_state, get_world_size(), precision.autocast
    ctx.optimizer = optimizer
    criterion = method.criterion(ctx)
    setup = EpochSetup(criterion=criterion, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       precision=precision, n_old=ctx.n_old, n_new=ctx.n_new, grad_accum=cfg.grad_accum,
                       log_interval=cfg.print_interval, show_progress=not cfg.no_progress, hooks=method,
                       epochs=cfg.epochs, clip_grad=cfg.clip_grad)
    return setup, ctx


def fit(cfg, step: int, model, train_model, model_old, loaders, setup, device, board, start_epoch: int,
        final_path: str, method: MethodStack, lr: float | None = None, record: dict | None = None) -> float:
    """The epoch loop: train, validate every ``--val_interval`` (and every ``--val_every_iters`` updates for the
    model selection), checkpoint every ``--ckpt_interval``."""
    train_loader, val_loader, _ = loaders
    score = 0.0
    t_fit = time.perf_counter()
    selection = restored_selection(cfg, final_path)
    per_epoch = -(-len(train_loader) // cfg.grad_accum)
    interval = selection_interval(cfg, per_epoch)
    state = {"updates": start_epoch * per_epoch, "epoch": start_epoch}

    def validate(where: str, what: str, samples=None) -> dict:
        cm = train.evaluate(model, val_loader, n_classes=sum(model.classes), device=device, precision=setup.precision,
                            show_progress=not cfg.no_progress, sample_hook=samples, predict=method.predict,
                            what=what)
        res = cm.results()
        log.info("%s validation mIoU %.2f %%", where, 100 * res["Mean IoU"])
        return res

    def after_update() -> None:  # SSUL's selection: validate every `interval` optimiser updates
        nonlocal selection
        state["updates"] += 1
        if state["updates"] % interval == 0:
            where = f"step {step} update {state['updates']}"
            res = validate(where, f"{where} validation")
            selection = select_best(selection, model, res["Class IoU"], setup.n_old, state["epoch"],
                                    update=state["updates"])
            model.train()

    if interval:
        setup.after_update = after_update
        log.info("step %d: --select_best_on_val validates every %d optimiser updates (of %d)", step, interval,
                 cfg.epochs * per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        state["epoch"] = epoch
        train_loader.sampler.set_epoch(epoch)
        method.begin_epoch(epoch, cfg.epochs)
        t0 = time.perf_counter()
        means = train.train_one_epoch(train_model, model_old, train_loader, setup, step=step, epoch=epoch,
                                      board=board, device=device)
        done = epoch + 1 - start_epoch
        log.info("%s done in %s (step ETA %s): %s", train.epoch_label(step, epoch, cfg.epochs),
                 duration(time.perf_counter() - t0), eta(time.perf_counter() - t_fit, done, cfg.epochs - start_epoch),
                 " ".join(f"{k}={v:.4f}" for k, v in means.items()))
        warn_about_epoch(step, epoch, cfg.epochs, means, setup.criterion.epoch_notes())
        for k, v in means.items():
            board.scalar(f"E-{k}/{step}", v, epoch)
        if (epoch + 1) % cfg.val_interval == 0:  # the reference validates at multiples only
            samples = sample_collector(cfg, step) if cfg.sample_num > 0 and board.writer else None
            res = validate(train.epoch_label(step, epoch, cfg.epochs), f"step {step} validation", samples)
            score = res["Mean IoU"]
            if step > 0 and logger.once("masked validation"):
                log.info("note: validation at step > 0 scores the step's own labels (old classes masked to "
                         "background, --data_masking %s, as in the reference), so its mIoU is not the test "
                         "mIoU over all classes seen so far printed after the step", cfg.data_masking)
            if cfg.select_best_on_val and not interval:
                selection = select_best(selection, model, res["Class IoU"], setup.n_old, epoch)
            board.scalar(f"Val_MeanIoU/{step}", score, epoch)
            board.scalar(f"Val_Overall_Acc/{step}", res["Overall Acc"], epoch)
            board.text(f"Val_Class_IoU/{step}", class_table(res["Class IoU"]), epoch)
            board.text(f"Val_Acc_IoU/{step}", class_table(res["Class Acc"]), epoch)
            for k, picture in enumerate(samples.panels if samples else []):
                board.image(f"Sample_{k}/{step}", picture.transpose(2, 0, 1), epoch)
        if (epoch + 1) % cfg.ckpt_interval == 0 and epoch + 1 < cfg.epochs and is_main_process():
            save_checkpoint(partial_ckpt_path(final_path),
                            **checkpoint_content(cfg, model, setup, epoch + 1, score, method, lr, record=record),
                            **({"selection": selection} if selection else {}))
    if selection:
        model.load_state_dict(selection["state"])
        at = f"update {selection['update']}" if selection.get("update") else f"epoch {selection['epoch'] + 1}"
        log.info("step %d: keeping the weights of %s (epoch %d/%d), the best validation mIoU of the step's new "
                 "classes (%.2f %%; --select_best_on_val: on VOC and ADE20K the validation images are the test images)",
                 step, at, selection["epoch"] + 1, cfg.epochs, 100 * selection["score"])
    return score


def selection_interval(cfg, updates_per_epoch: int) -> int:
    """Optimiser updates between the validations of ``--val_every_iters`` (0: none); ``auto`` is SSUL's
    ``max(100, total // 100)`` (clovaai/SSUL main.py L362-363)."""
    if not cfg.select_best_on_val or not cfg.val_every_iters:
        return 0
    if cfg.val_every_iters == "auto":
        return max(100, cfg.epochs * updates_per_epoch // 100)
    return int(cfg.val_every_iters)


def select_best(selection: dict | None, model, class_iou: dict, n_old: int, epoch: int,
                update: int | None = None) -> dict | None:
    """SSUL's model selection: the weights with the best validation mIoU of the step's new classes (every class at
    step 0), kept in memory and in the in-step checkpoint."""
    values = [v for k, v in class_iou.items() if k >= n_old and isinstance(v, float)]
    if not values:
        return selection
    new_score = sum(values) / len(values)
    if selection is None or new_score > selection["score"]:
        return {"score": new_score, "epoch": epoch, "update": update,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return selection


def warn_about_epoch(step: int, epoch: int, epochs: int, means: dict[str, float], notes: list[str]) -> None:
    """A step that learns nothing says so: every loss term 0 for an epoch, or a term's own note (no pseudo-label
    accepted). Once per step and kind."""
    where = train.epoch_label(step, epoch, epochs)
    if means and all(v == 0.0 for v in means.values()) and logger.once(f"zero loss {step}"):
        log.warning("%s: every loss term is 0 (%s): the step learns nothing; usually no training pixel has a "
                    "label (all ignored, or no pseudo-label accepted)", where, ", ".join(means))
    for note in notes:
        if logger.once(f"{step} {note[:40]}"):
            log.warning("%s: %s", where, note)


def class_table(values: dict) -> str:
    """Markdown table ``class | value`` for the TensorBoard text tabs (the reference's ``add_table``)."""
    rows = [f"| {k} | {v if isinstance(v, str) else f'{v:.4f}'} |" for k, v in values.items()]
    return "\n".join(["| class | value |", "|---:|---:|", *rows])


def sample_collector(cfg, step: int) -> SampleCollector:
    """Collects ``--sample_num`` validation panels (image | ground truth | prediction) in the dataset palette."""
    return SampleCollector(cfg.sample_num, space_reader(cfg.dataset).colorize,
                           index_to_class_lut(order(cfg.dataset, cfg.task, step)))


def run_record(cfg, step: int, lr: float, recipe: Recipe | None, norm_layers: str) -> dict:
    """How this step was trained, stored next to the results CSV (the reproduction ledger compares it with the
    recipe of the published number) and in the final checkpoint. ``train_id`` names this training: a later test
    of the same checkpoint carries it, so that report.py counts the result once."""
    return {"task": cfg.task, "method": cfg.method, "name": cfg.name, "lr": lr, "epochs": cfg.epochs,
            "effective_batch": effective_batch(cfg), "batch_size": cfg.batch_size, "processes": get_world_size(),
            "grad_accum": cfg.grad_accum, "overlap": bool(cfg.overlap), "random_seed": cfg.random_seed,
            "recipe": recipe.id if recipe else None, "data": data_kind(cfg.data_root),
            "norm_act": cfg.norm_act, "norm_layers": norm_layers, "backbone": cfg.backbone,
            "selected_on": selected_on(cfg),
            "train_id": uuid.uuid4().hex[:16], "command": command_line()}


def selected_on(cfg) -> str | None:
    """Where ``--select_best_on_val`` picks the step's weights: the validation images are the test images unless
    validation comes from the training set (``--cross_val``) or the test set does (``--val_on_trainset``). The ledger
    flags results selected on the test images."""
    if not cfg.select_best_on_val:
        return None
    return "held-out images" if cfg.cross_val or cfg.val_on_trainset else "the test images"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def tested_record(ckpt: dict, path: str) -> dict | None:
    """The run record of a test of an existing checkpoint: how it was trained (from the checkpoint) and that it
    was tested now; None for checkpoints without one (reference files, older versions)."""
    saved = ckpt.get("run_record") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        return None
    return {**saved, "tested_from": path, "test_command": command_line()}


def test_step(cfg, step: int, model, test_loaders: dict, precision, device, board, method: MethodStack,
              record: dict | None = None) -> dict:
    """Evaluate on each cumulative test set (``{"": the run's, source: another dataset's}``); write its CSV row and
    old/new/all summary (rank 0). Returns the first test set's numbers."""
    check_finite_model(model, f"the model of step {step}", "no result is computed from it; retrain the step")
    paths, first = results_paths(cfg, step), None
    primary = first_test_source(cfg.dataset) if len(test_sources(cfg.dataset)) > 1 else ""
    for test, loader in test_loaders.items():
        where = f" on {test}" if test else ""
        cm = train.evaluate(model, loader, n_classes=sum(model.classes), device=device, precision=precision,
                            show_progress=not cfg.no_progress, predict=method.predict,
                            what=f"step {step} test{where}")
        res = cm.results()
        groups = score_groups(cfg.dataset, cfg.task, step)
        split = summary.compute(summary.ClassScores.from_results(res, model.classes, groups), summary.SUMMARY)
        log.info("step %d test%s: mIoU %.2f %%, %s %%", step, where, 100 * res["Mean IoU"],
                 summary.format_slashed(split))
        if groups is not None:
            log.info("step %d test%s, weak-shot task %s: base / novel / all %s / %s / %s %% (novel: SimFormer's "
                     "headline)", step, where, cfg.task, *(summary.percent(split[k]) for k in ("old", "new", "all")))
        tag = f"_{test}" if test else ""
        board.scalar(f"T{tag}_MeanIoU", res["Mean IoU"], step)
        board.scalar(f"T{tag}_Overall_Acc", res["Overall Acc"], step)
        board.scalar(f"T{tag}_MeanAcc", res["Mean Acc"], step)
        board.text(f"Test{tag}_Class_IoU", class_table(res["Class IoU"]), step)
        board.text(f"Test{tag}_Class_Acc", class_table(res["Class Acc"]), step)
        if is_main_process():
            path = paths[test]
            n_total = space_reader(cfg.dataset).NUM_CLASSES
            upsert_row(path, step, csv_row(step, res["Class IoU"], sum(model.classes), n_total, res["Mean IoU"]))
            if record is not None:
                update_run_record(path, step, record)
            log.info("results: %s\n%s", path, write_summary(cfg, path, test or primary))
        first = first or {**res, **split}
    return first


def run_step(cfg, step: int, lr: float, *, first_step_of_call: bool, device: torch.device, method: MethodStack,
             recipe: Recipe | None = None, position: str = "") -> dict:
    """One incremental step: data, models, training (or resume), final checkpoint, test, results. ``recipe``: the
    published recipe the run follows (recorded with the results). A step trained and tested by an earlier call is
    skipped; one trained but not tested (killed in between) is only tested. ``position``: e.g. ``2/5 of this
    call``, for the log."""
    final_path = ckpt_path(cfg, step)
    results = results_csv_path(cfg.results_dir, cfg.date, cfg.dataset, cfg.task, cfg.name)
    finished = not cfg.test and not cfg.overwrite and os.path.isfile(final_path)
    if finished and all(step in read_rows(path) for path in results_paths(cfg, step).values()):
        skip_finished_step(cfg, step, lr, final_path, results, position, method)
        return {}
    seed_everything(cfg.random_seed)
    precision = resolve_precision(cfg, device)
    configure_backends(cfg, device)
    loaders, train_dataset = build_loaders(cfg, step, device, method)
    board = logger.Board(log_folder(cfg) if cfg.visualize else None)
    if cfg.test or finished:
        log.info("== step %d (%s): %s", step, position, "test of " + (cfg.ckpt or final_path) if cfg.test else
                 f"trained ({final_path}) but has no row in {results}: testing it")
        model = build_model(cfg, step, pretrained=False, method=method).to(device)
        ckpt = load_weights(model, cfg.ckpt or final_path, strict=cfg.strict_weights, what="step checkpoint", cfg=cfg)
        return test_step(cfg, step, model, loaders[2], precision, device, board, method,
                         tested_record(ckpt, cfg.ckpt or final_path))
    log.info("== step %d (%s): %d epochs of %d iterations, lr %g, %s", step, position, cfg.epochs,
             len(loaders[0]), lr, describe_batch(cfg))
    ctx = StepContext(step=step, classes=classes_for_step(cfg, step), model=None, device=device,
                      train_loader=loaders[0], world_size=get_world_size(), autocast=precision.autocast,
                      train_dataset=train_dataset, method=method, lr=lr, checkpoint_path=final_path,
                      resume_from=resume_source(cfg, final_path), no_auto_resume=bool(cfg.no_auto_resume),
                      amp_dtype=precision.dtype)
    model, model_old, trainer_state = prepare_models(cfg, step, device, first_step_of_call, method=method, ctx=ctx)
    if logger.once("norm fallback") and (note := norm_fallback_note(cfg, model)):
        log.info(note)
    record = run_record(cfg, step, lr, recipe, describe_norm_layers(model))
    record_training_config(cfg, step)
    setup, ctx = build_setup(cfg, step, lr, model, model_old, loaders[0], trainer_state, precision, device,
                             method=method, ctx=ctx)
    start_epoch = resume_if_possible(cfg, model, setup, final_path, method, lr, record)
    method.before_step(ctx)
    setup.criterion.before_step(ctx)
    train_model = wrap_for_training(cfg, model, device)
    if cfg.channels_last and model_old is not None:  # same layout as the images it sees
        model_old.to(memory_format=torch.channels_last)
    score = fit(cfg, step, model, train_model, model_old, loaders, setup, device, board, start_epoch, final_path,
                method, lr, record)
    method.after_step(ctx)
    check_finite_model(model, f"the model of step {step} after training", train.RERUN_HINT)
    if is_main_process():
        save_checkpoint(final_path, **checkpoint_content(cfg, model, setup, cfg.epochs, score, method, lr,
                                                         record=record, final=True))
        if os.path.exists(partial_ckpt_path(final_path)):
            os.remove(partial_ckpt_path(final_path))
        remove_stale_temporaries(partial_ckpt_path(final_path))
    barrier()
    result = test_step(cfg, step, model, loaders[2], precision, device, board, method, record)
    board.close()
    return result


def skip_finished_step(cfg, step: int, lr: float, final_path: str, results: str, position: str,
                       method: MethodStack) -> None:
    """A step trained and tested by an earlier call is left as it is; this says so, names the training flags in
    which this call differs from the one that trained it, and completes the summary a full disk left unwritten."""
    saved = safe_load(final_path, "step checkpoint")
    diff = training_differences(saved, cfg, lr)
    if diff:
        log.warning("step %d is already trained and tested (%s, row in %s) with other training flags than this "
                    "call's (%s): skipped (%s); its checkpoint and results are the earlier training's; --overwrite "
                    "retrains it with this call's flags", step, final_path, results, diff, position)
    else:
        log.info("step %d is already trained and tested (%s, row in %s): skipped (%s); --overwrite retrains it, "
                 "--test evaluates it again", step, final_path, results, position)
    if is_main_process() and not os.path.isfile(summary_path(results)):
        write_summary(cfg, results)
        log.info("step %d: wrote the missing summary %s", step, summary_path(results))


def write_summary(cfg, path: str, test: str = "") -> str:
    """The old / new / all summary of every row of the results CSV ``path`` (rank 0); ``test``: its test source."""
    written = read_run(path, columns="remapped")
    rows = [{"step": s, **step_scores(written, s)} for s in sorted(written.values)]
    where = f"{test} " if test else ""
    groups = ", old = base and new = novel classes" if score_groups(cfg.dataset, cfg.task, 0) else ""
    text = format_summary(rows, f"{cfg.dataset} {cfg.task} {cfg.name} (mIoU %, {where}test set{groups})")
    atomic_write_text(summary_path(path), text)
    return text


def check_finite_model(model, what: str, hint: str) -> None:
    """Stop before a checkpoint or a number is written from weights holding NaN or inf."""
    bad = nonfinite_in_model(model)
    if bad is not None:
        raise UserError(f"{what} holds NaN or inf ({bad}); nothing was written: {hint}")


def effective_batch(cfg) -> int:
    return cfg.batch_size * get_world_size() * cfg.grad_accum


def describe_batch(cfg) -> str:
    return (f"effective batch {effective_batch(cfg)} (batch_size {cfg.batch_size} x {get_world_size()} processes x "
            f"grad_accum {cfg.grad_accum})")


def find_recipe(cfg) -> Recipe | None:
    """The published recipe (scripts/recipes.toml) whose flags these are; None when none matches."""
    recipe = match(cfg, functools.partial(parse_config, warn=False))
    if recipe is None:
        log.info("no recipe of scripts/recipes.toml matches these flags: lr and batch are not compared with a "
                 "published script")
    else:
        log.info("these flags follow %s", recipe.describe())
    return recipe


def compare_with_recipe(cfg, recipe: Recipe | None) -> None:
    """One warning for the whole call listing where lr, epochs or the effective batch of its steps differ from the
    recipe the run follows (deliberate settings are stated once, not once per step)."""
    if recipe is None:
        return
    steps_of: dict[tuple, list[int]] = {}
    for step, lr in step_lrs(cfg):
        for what, ours, theirs in (("lr", lr, recipe.lr_at(step)), ("epochs", cfg.epochs, recipe.epochs_at(step))):
            if ours != theirs:
                steps_of.setdefault((what, ours, theirs), []).append(step)
    diffs = [f"{what} {ours:g} at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} (published "
             f"{theirs:g})" for (what, ours, theirs), steps in steps_of.items()]
    if effective_batch(cfg) != recipe.batch:
        diffs.append(f"effective batch {effective_batch(cfg)} (published {recipe.batch}; --grad_accum keeps the "
                     "batch on fewer GPUs)")
    if diffs:
        log.warning("this run differs from %s: %s; results may differ from the published ones", recipe.describe(),
                    "; ".join(diffs))


def start_run_files(cfg) -> None:
    """The run's folder (next to its TensorBoard events), rank 0: every call's command line appended to
    ``command.txt`` and its resolved configuration appended to ``calls.jsonl`` (one JSON object per call), and the
    log of every call appended to ``run.log``. ``config.json`` is written only when a step starts training
    (:func:`record_training_config`), so a call that only skips or refuses leaves it alone."""
    if not is_main_process():
        return
    folder = log_folder(cfg)
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(os.path.join(folder, "command.txt"), "a", encoding="utf-8") as handle:
        handle.write(f"# {stamp} in {os.getcwd()}\n{command_line()}\n")
    with open(os.path.join(folder, "calls.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": stamp, "cwd": os.getcwd(), "command": command_line(),
                                 "config": to_dict(cfg)}, sort_keys=True, default=str) + "\n")
    logger.open_log_file(os.path.join(folder, "run.log"))
    log.info("run folder %s: command.txt, calls.jsonl, run.log (config.json: the flags of the last training)", folder)


def record_training_config(cfg, step: int) -> None:
    """``config.json`` in the run folder: the resolved flags of the call that trains ``step`` now (rank 0)."""
    if is_main_process():
        text = json.dumps({**to_dict(cfg), "trained_step": step}, indent=1, sort_keys=True, default=str) + "\n"
        atomic_write_text(os.path.join(log_folder(cfg), "config.json"), text)


def experiment_lock(cfg):
    """The experiment's lock (checkpoint folder, --name) for the whole call, taken by the first process only (the
    others of a torchrun job share it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    check_writable(cfg.checkpoint, "--checkpoint")
    return RunLock(cfg.checkpoint, f"{cfg.task}-{cfg.dataset}_{cfg.name}",
                   label=f"--name {cfg.name} (task {cfg.task}, {cfg.dataset})")


def main(argv=None) -> int:
    cfg = None
    logger.reset_once()
    try:
        notes: list[str] = []
        cfg = parse_config(argv, notes=notes)
        logger.setup_logging(cfg.debug)
        method = build_method(cfg)  # once per call: every step and check below uses this stack
        with experiment_lock(cfg):
            validate_run(cfg, method)
            device = select_device(cfg)
            init_distributed(device.type)
            logger.setup_logging(cfg.debug)  # again: the rank (log prefix, rank-0-only INFO) is known only now
            start_run_files(cfg)
            for note in notes:  # the command line's warnings, now that run.log records them too
                log.warning("%s", note)
            recipe = find_recipe(cfg)
            compare_with_recipe(cfg, recipe)
            with cpu_threads(cfg) as threads:
                log.info("%s", threads)
                run_steps(cfg, device, recipe, method)
        return 0
    except UserError as exc:
        if cfg is not None and cfg.debug:
            raise
        line = f"error: {f'rank {get_rank()}: ' if is_distributed() else ''}{one_line(exc)}"
        print(line, file=sys.stderr)
        logger.write_to_log_file(line)
        return 2
    except KeyboardInterrupt:
        line = "interrupted: rerun the same command to continue the step from its last checkpoint"
        print(line, file=sys.stderr)
        logger.write_to_log_file(line)
        return 130
    except RuntimeError as exc:  # a collective broken by another rank that failed, exited or timed out
        message = peer_failure_message(exc)
        if message is None or (cfg is not None and cfg.debug):
            raise
        print(f"error: {message}", file=sys.stderr)
        logger.write_to_log_file(f"error: {message}")
        return 1
    finally:
        logger.close_log_file()
        cleanup()


def run_steps(cfg, device, recipe: Recipe | None, method: MethodStack) -> None:
    """The steps of this call in order, each saying which of how many it is, with an ETA for the call."""
    plan = step_lrs(cfg)
    start = time.perf_counter()
    for i, (step, lr) in enumerate(plan):
        run_step(cfg, step, lr, first_step_of_call=(i == 0), device=device, method=method, recipe=recipe,
                 position=f"{i + 1}/{len(plan)} of this call")
        if len(plan) > 1:
            log.info("%s", status("steps of this call", i + 1, len(plan), time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(main())
