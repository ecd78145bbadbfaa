"""Train and test one or more incremental steps: ``python run.py --dataset voc --task 15-1 --step 0 1 ...``.

Runs on the CPU or one GPU without a launcher, and under ``torchrun --nproc_per_node=N`` with DDP.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch

from utils.errors import UserError

log = logging.getLogger("run")
VERSION = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(cfg, device: torch.device):
    """``--amp`` wins; else ``--opt_level`` O1/O2 mean fp16 autocast on GPU (apex is gone), fp32 on CPU."""
    from train import Precision

    mode = cfg.amp or ("fp16" if cfg.opt_level in ("O1", "O2") and device.type == "cuda" else "off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    if dtype is torch.float16 and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on the CPU")
    return Precision(device.type, dtype, cfg.channels_last)


def build_loaders(cfg, step: int, device: torch.device):
    """Train, validation and test loaders of ``step``; evaluation batch = --batch_size on centre crops (default),
    1 on full images with --crop_val (reference)."""
    from utils.builders import build_step_datasets
    from utils.data import build_loader

    from utils.dist import get_world_size

    train_ds, val_ds, test_ds = build_step_datasets(cfg, step)
    per_process = len(train_ds) // get_world_size()
    if per_process < cfg.batch_size:
        raise UserError(f"step {step} of {cfg.dataset} {cfg.task} has {len(train_ds)} training images, "
                        f"{per_process} per process, fewer than --batch_size {cfg.batch_size}: lower --batch_size "
                        "or use a larger dataset")
    pin = device.type == "cuda"
    eval_bs = cfg.batch_size if cfg.crop_val else 1
    common = {"num_workers": cfg.num_workers, "seed": cfg.random_seed, "pin_memory": pin}
    return (build_loader(train_ds, batch_size=cfg.batch_size, train=True, **common),
            build_loader(val_ds, batch_size=eval_bs, train=False, **common),
            build_loader(test_ds, batch_size=eval_bs, train=False, **common))


def prepare_models(cfg, step: int, device: torch.device, first_step_of_call: bool):
    """The model of ``step`` (previous weights loaded and new classifier initialised) and the frozen old model."""
    from utils.builders import build_model, load_previous_step

    if step == 0:
        return build_model(cfg, 0, pretrained=True).to(device), None, {}
    # new model first: its new classifier's default init is drawn right after the seed, as in the reference
    model = build_model(cfg, step, pretrained=False)
    model_old, prev = load_previous_step(cfg, step, device, first_step_of_call=first_step_of_call)
    missing, unexpected = model.load_state_dict(model_old.state_dict(), strict=False)
    new_keys = {f"cls.{len(model.cls) - 1}.weight", f"cls.{len(model.cls) - 1}.bias"}
    if unexpected or set(missing) - new_keys:
        raise UserError(f"previous-step model does not fit step {step}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    model.to(device)
    from methods.awt import prepare_new_classifier

    prepare_new_classifier(cfg, step, model, model_old, device)
    trainer_state = prev.get("trainer_state") or {}
    return model, model_old, trainer_state


def configure_backends(cfg, device: torch.device) -> None:
    """cuDNN autotuning on CUDA (fixed input sizes), deterministic cuDNN kernels instead with --deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = bool(cfg.deterministic)


def wrap_for_training(cfg, model, device: torch.device):
    """Channels-last, DDP and torch.compile as asked; returns the module the training loop calls."""
    from utils.dist import get_world_size

    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = model
    if get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def build_setup(cfg, step: int, lr: float, model, model_old, train_loader, trainer_state, precision, device):
    """Optimiser, schedule, scaler and the criterion of this step."""
    from methods import StepContext, build_criterion
    from train import EpochSetup
    from utils.builders import classes_for_step
    from utils.dist import get_world_size
    from utils.optim import apply_freezing, build_optimizer, build_param_groups, build_scheduler

    apply_freezing(model, cfg, step)
    optimizer = build_optimizer(build_param_groups(model, cfg, lr, step), cfg, lr)
    iters = cfg.epochs * -(-len(train_loader) // cfg.grad_accum)
    scheduler = build_scheduler(optimizer, cfg, iters)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype is torch.float16)
    classes = classes_for_step(cfg, step)
    ctx = StepContext(step=step, classes=classes, model=model, model_old=model_old, device=device,
                      train_loader=train_loader, trainer_state=trainer_state, world_size=get_world_size(),
                      autocast=precision.autocast)
    criterion = build_criterion(cfg, ctx)
    setup = EpochSetup(criterion=criterion, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       precision=precision, n_old=ctx.n_old, n_new=ctx.n_new, grad_accum=cfg.grad_accum,
                       log_interval=cfg.print_interval, show_progress=not cfg.no_progress)
    return setup, ctx


def checkpoint_content(cfg, model, setup, epoch: int, best_score: float) -> dict:
    """The reference keys plus what an exact resume needs."""
    from utils.config import dump

    state = setup.criterion.state_dict()
    return {"epoch": epoch, "model_state": model.state_dict(), "optimizer_state": setup.optimizer.state_dict(),
            "scheduler_state": setup.scheduler.state_dict(), "scaler_state": setup.scaler.state_dict(),
            "best_score": best_score, "trainer_state": {"regularizer": None, **state},
            "rng_state": {"torch": torch.get_rng_state()}, "config": dump(cfg), "version": VERSION}


def resume_if_possible(cfg, model, setup, final_path: str) -> int:
    """Restore an interrupted step (``.partial.pth`` or ``--ckpt``); returns the epoch to start from."""
    from utils.checkpoint import check_resume_config, model_state, partial_ckpt_path, safe_load

    path = cfg.ckpt or partial_ckpt_path(final_path)
    if not os.path.isfile(path) or (cfg.no_auto_resume and not cfg.ckpt):
        if cfg.ckpt:  # --resume without an in-step checkpoint is refused up front (utils/validate.py)
            raise UserError(f"nothing to resume: --ckpt {path} does not exist")
        return 0
    ckpt = safe_load(path, "resume checkpoint")
    check_resume_config(ckpt, cfg, path)
    model.load_state_dict(model_state(ckpt, path), strict=cfg.strict_weights)
    setup.optimizer.load_state_dict(ckpt["optimizer_state"])
    setup.scheduler.load_state_dict(ckpt["scheduler_state"])
    if ckpt.get("scaler_state"):
        setup.scaler.load_state_dict(ckpt["scaler_state"])
    setup.criterion.load_state_dict(ckpt.get("trainer_state") or {})
    if "rng_state" in ckpt:
        torch.set_rng_state(ckpt["rng_state"]["torch"])
    log.info("resuming step from %s after epoch %d", path, ckpt["epoch"])
    return int(ckpt["epoch"])


def fit(cfg, step: int, model, train_model, model_old, loaders, setup, device, board, start_epoch: int,
        final_path: str) -> float:
    """The epoch loop: train, validate every ``--val_interval``, checkpoint every ``--ckpt_interval``."""
    from train import evaluate, train_one_epoch
    from utils.checkpoint import partial_ckpt_path, save_checkpoint
    from utils.dist import is_main_process

    train_loader, val_loader, _ = loaders
    score = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        means = train_one_epoch(train_model, model_old, train_loader, setup, step=step, epoch=epoch, board=board,
                                device=device)
        log.info("step %d epoch %d done in %.1fs: %s", step, epoch, time.time() - t0,
                 " ".join(f"{k}={v:.4f}" for k, v in means.items()))
        for k, v in means.items():
            board.scalar(f"E-{k}/{step}", v, epoch)
        if (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs:
            samples = sample_collector(cfg, step) if cfg.sample_num > 0 and board.writer else None
            cm = evaluate(model, val_loader, n_classes=sum(model.classes), device=device,
                          precision=setup.precision, show_progress=not cfg.no_progress, sample_hook=samples)
            res = cm.results()
            score = res["Mean IoU"]
            log.info("step %d epoch %d validation mIoU %.4f", step, epoch, score)
            board.scalar(f"Val_MeanIoU/{step}", score, epoch)
            board.scalar(f"Val_Overall_Acc/{step}", res["Overall Acc"], epoch)
            board.text(f"Val_Class_IoU/{step}", class_table(res["Class IoU"]), epoch)
            board.text(f"Val_Acc_IoU/{step}", class_table(res["Class Acc"]), epoch)
            for k, picture in enumerate(samples.panels if samples else []):
                board.image(f"Sample_{k}/{step}", picture.transpose(2, 0, 1), epoch)
        if (epoch + 1) % cfg.ckpt_interval == 0 and epoch + 1 < cfg.epochs and is_main_process():
            save_checkpoint(partial_ckpt_path(final_path), **checkpoint_content(cfg, model, setup, epoch + 1, score))
    return score


def class_table(values: dict) -> str:
    """Markdown table ``class | value`` for the TensorBoard text tabs (the reference's ``add_table``)."""
    rows = [f"| {k} | {v if isinstance(v, str) else f'{v:.4f}'} |" for k, v in values.items()]
    return "\n".join(["| class | value |", "|---:|---:|", *rows])


def sample_collector(cfg, step: int):
    """Collects ``--sample_num`` validation panels (image | ground truth | prediction) in the dataset palette."""
    from dataset import READERS
    from dataset.tasks import order
    from utils.visualize import SampleCollector, index_to_class_lut

    return SampleCollector(cfg.sample_num, READERS[cfg.dataset].colorize,
                           index_to_class_lut(order(cfg.dataset, cfg.task, step)))


def test_step(cfg, step: int, model, test_loader, precision, device, board) -> dict:
    """Evaluate on the cumulative test set; write the CSV row and the old/new/all summary (rank 0)."""
    from metrics.results import csv_row, format_summary, results_csv_path, summary_path, upsert_row
    from metrics.stream_metrics import old_new_all
    from dataset import READERS
    from train import evaluate
    from utils.dist import is_main_process
    from utils.io import atomic_write_text
    from utils.report import read_run, step_scores

    cm = evaluate(model, test_loader, n_classes=sum(model.classes), device=device, precision=precision,
                  show_progress=not cfg.no_progress)
    res = cm.results()
    split = old_new_all(res["Class IoU"], model.classes[0], sum(model.classes))
    log.info("step %d test: mIoU %.4f, old / new / all %s", step, res["Mean IoU"],
             " / ".join("-" if math.isnan(split[k]) else f"{split[k]:.4f}" for k in ("old", "new", "all")))
    board.scalar("T_MeanIoU", res["Mean IoU"], step)
    board.scalar("T_Overall_Acc", res["Overall Acc"], step)
    board.scalar("T_MeanAcc", res["Mean Acc"], step)
    board.text("Test_Class_IoU", class_table(res["Class IoU"]), step)
    board.text("Test_Class_Acc", class_table(res["Class Acc"]), step)
    if is_main_process():
        path = results_csv_path(cfg.results_dir, cfg.date, cfg.dataset, cfg.task, cfg.name)
        n_total = READERS[cfg.dataset].NUM_CLASSES
        upsert_row(path, step, csv_row(step, res["Class IoU"], sum(model.classes), n_total, res["Mean IoU"]))
        written = read_run(path, columns="remapped")
        rows = [{"step": s, **step_scores(written, s)} for s in sorted(written.values)]
        text = format_summary(rows, f"{cfg.dataset} {cfg.task} {cfg.name} (mIoU %, test set)")
        atomic_write_text(summary_path(path), text)
        log.info("results: %s\n%s", path, text)
    return {**res, **split}


def run_step(cfg, step: int, lr: float, *, first_step_of_call: bool, device: torch.device) -> dict:
    """One incremental step: data, models, training (or resume), final checkpoint, test, results."""
    from utils.builders import ckpt_path, load_weights, build_model
    from utils.checkpoint import partial_ckpt_path, save_checkpoint
    from utils.dist import barrier, is_main_process
    from utils.logger import Board

    seed_everything(cfg.random_seed)
    precision = resolve_precision(cfg, device)
    configure_backends(cfg, device)
    final_path = ckpt_path(cfg, step)
    log.info("step %d: lr %g, %s", step, lr, describe_batch(cfg))
    published_lr = PUBLISHED_LR[0] if step == 0 else PUBLISHED_LR[1]
    if lr != published_lr:
        log.warning("lr %g at step %d differs from the published %g (0.02 at step 0, 0.001 after)", lr, step,
                    published_lr)
    loaders = build_loaders(cfg, step, device)
    board = Board(os.path.join(cfg.logdir, f"{cfg.task}-{cfg.dataset}", cfg.name) if cfg.visualize else None)
    if cfg.test:
        model = build_model(cfg, step, pretrained=False).to(device)
        load_weights(model, cfg.ckpt or final_path, strict=cfg.strict_weights, what="step checkpoint")
        return test_step(cfg, step, model, loaders[2], precision, device, board)
    model, model_old, trainer_state = prepare_models(cfg, step, device, first_step_of_call)
    setup, ctx = build_setup(cfg, step, lr, model, model_old, loaders[0], trainer_state, precision, device)
    start_epoch = resume_if_possible(cfg, model, setup, final_path)
    setup.criterion.before_step(ctx)
    train_model = wrap_for_training(cfg, model, device)
    if cfg.channels_last and model_old is not None:  # same layout as the images it sees
        model_old.to(memory_format=torch.channels_last)
    score = fit(cfg, step, model, train_model, model_old, loaders, setup, device, board, start_epoch, final_path)
    if is_main_process():
        save_checkpoint(final_path, **checkpoint_content(cfg, model, setup, cfg.epochs, score))
        if os.path.exists(partial_ckpt_path(final_path)):
            os.remove(partial_ckpt_path(final_path))
    barrier()
    result = test_step(cfg, step, model, loaders[2], precision, device, board)
    board.close()
    return result


def describe_batch(cfg) -> str:
    """States the effective batch and warns when it differs from the published 24."""
    from utils.dist import get_world_size

    effective = cfg.batch_size * get_world_size() * cfg.grad_accum
    text = f"effective batch {effective} (batch_size {cfg.batch_size} x {get_world_size()} processes x grad_accum " \
           f"{cfg.grad_accum})"
    if effective != PUBLISHED_BATCH:
        log.warning("effective batch %d differs from the published %d: results may differ from the papers "
                    "(use --grad_accum to match)", effective, PUBLISHED_BATCH)
    return text


PUBLISHED_BATCH = 24  # 2 GPUs x 12 in every AWT/PLOP script
PUBLISHED_LR = (0.02, 0.001)  # step 0, later steps (AWT/PLOP scripts)


def main(argv=None) -> int:
    from utils.config import parse_config, step_lrs
    from utils.dist import cleanup, init_distributed
    from utils.logger import setup_logging

    cfg = None
    try:
        cfg = parse_config(argv)
        setup_logging(cfg.debug)
        from utils.validate import validate_run

        validate_run(cfg)
        from utils.builders import select_device

        device = select_device(cfg)
        init_distributed(device.type)
        setup_logging(cfg.debug)  # again: the rank (log prefix, rank-0-only INFO) is known only now
        for i, (step, lr) in enumerate(step_lrs(cfg)):
            run_step(cfg, step, lr, first_step_of_call=(i == 0), device=device)
        return 0
    except UserError as exc:
        if cfg is not None and cfg.debug:
            raise
        from utils.dist import get_rank, is_distributed
        from utils.errors import one_line

        print(f"error: {f'rank {get_rank()}: ' if is_distributed() else ''}{one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the step from its last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a collective broken by another rank that failed, exited or timed out
        from utils.dist import peer_failure_message

        message = peer_failure_message(exc)
        if message is None or (cfg is not None and cfg.debug):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
