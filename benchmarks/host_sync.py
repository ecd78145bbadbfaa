"""Host-device synchronisation audit of the training loop.

Runs a few real iterations of ``train.train_one_epoch`` for a method on a small CPU model (built, prepared and fed
through the method's plugins as run.py does: its model family, ``prepare_model``, terms, ``compose_batch``) and
records every
operation that makes the host wait for a CUDA device: reading a value (``.item()``, ``float(t)``, ``if t:``),
boolean indexing and ``nonzero`` (the output size depends on the data), ``unique``, ``bincount``/``histc``, etc.
On a CPU nothing waits, but the same operations are dispatched, so the audit needs no GPU. Only the logging
iterations may synchronise (``train._check_finite``, ``train._log_iteration``, ``train._epoch_means``).

    python -m benchmarks.host_sync                                       # every preset (+ EWC/RW/PI at step 2)
    python -m benchmarks.host_sync --args "--method PLOP --pseudo median" --args "--method MiB --bce"
    python -m benchmarks.host_sync --args "--method RCIL" --args "--method MiB --dropclass"

Blind spots: ``.tolist()``, ``.numpy()`` and ``.cpu()`` read CPU memory without a dispatched operation, and the
fp16 ``GradScaler.step`` (it reads the inf/NaN flag) is not exercised on CPU; methods whose batches need the
loader's extra tensors (SSUL's saliency maps) and AWT's attribution pass (before training) are not audited here.
Exit status 1 if an operation outside the logging functions synchronises.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import ROOT, markdown_table, write_random_record
from experiment.builders import model_spec
from experiment.checkpoints import load_previous_into
from experiment.config import parse_config
from methods import StepContext, build_method
from segmentation_module import build_model_from_spec
from train import EpochSetup, Precision, train_one_epoch

aten = torch.ops.aten

# Operations whose CUDA kernels wait for the device (a value or an output size is needed on the host).
ALWAYS_SYNC = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default, aten.equal.default, aten.nonzero.default, aten.masked_select.default,
    aten.masked_scatter.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.bincount.default, aten.histc.default, aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

# Where the training loop is allowed to synchronise: the logging iterations (every --print_interval).
RECORDS = tempfile.mkdtemp(prefix="ciss-sync-")  # STAR's prototype records (random, see write_random_record)
LOGGING = {("train.py", "_check_finite"), ("train.py", "_log_iteration"), ("train.py", "_epoch_means")}
PRESET_RUNS = [(["--method", m], 1) for m in ("FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP")] + \
              [(["--method", m], 2) for m in ("EWC", "RW", "PI")]
PLUGIN_RUNS = [(["--method", "RCIL"], 1), (["--method", "RCIL"], 2), (["--method", "MiB", "--dropclass"], 1),
               (["--method", "PLOP", "--dropclass"], 1), (["--method", "RCIL", "--dropclass"], 2),
               (["--method", "DKD"], 1), (["--method", "DKD"], 2), (["--method", "STAR"], 1), (["--method", "STAR"], 2)]


@dataclass(frozen=True)
class Sync:
    op: str
    file: str  # relative to the repository root
    line: int
    function: str
    code: str


def _is_sync(func, args) -> bool:
    if func in ALWAYS_SYNC:
        return True
    if func in INDEXING:  # boolean masks become nonzero() inside the kernel
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (args[1] or ()))
    return False


def _caller() -> tuple[str, int, str, str]:
    """Innermost frame of this repository's code outside this file (the line that asked for the operation)."""
    import linecache

    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(ROOT + os.sep) and path != here and f"{os.sep}site-packages{os.sep}" not in path:
            line, code = frame.f_lineno, linecache.getline(path, frame.f_lineno).strip()
            while frame.f_code.co_name.startswith("<") and frame.f_back is not None:  # <genexpr>, <dictcomp>
                frame = frame.f_back
            return os.path.relpath(path, ROOT), line, frame.f_code.co_name, code
        frame = frame.f_back
    return "?", 0, "?", ""


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as rec: ...`` then ``rec.syncs``: one ``Sync`` per synchronising operation."""

    def __init__(self):
        super().__init__()
        self.syncs: list[Sync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            self.syncs.append(Sync(str(func), *_caller()))
        return func(*args, **(kwargs or {}))


def outside_logging(syncs: list[Sync]) -> list[Sync]:
    return [s for s in syncs if (s.file, s.function) not in LOGGING]


def _batches(n_classes: int, iters: int, size: int, device, seed: int = 1) -> list:
    """uint8 pixels and labels as the loader hands them over, already on the device (the copy is not audited)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(iters):
        y = torch.randint(0, n_classes, (2, size, size), generator=g, dtype=torch.uint8)
        y[:, :3] = 255
        x = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        out.append((x.to(device), y.to(device)))
    return out


def train_epoch(argv: list[str], step: int, classes: list[int], trainer_state: dict, *, iters: int,
                log_interval: int, amp: str = "off", device: str = "cpu", watch=None, warmup_epochs: int = 0):
    """One epoch of ``iters`` iterations of the method ``argv`` (run.py flags) at ``step`` on a small model of
    ``classes`` (per step), built as run.py builds it: the method's model family for the old and the new model,
    ``prepare_old_model``, the previous weights (``load_previous_into``), ``prepare_model``, its criterion and ``before_step``, ``begin_epoch``
    and ``compose_batch``, SGD, GradScaler for fp16 (the new classifier keeps its random init: AWT's pass needs data).
    ``watch``: a context manager entered around that epoch only, after ``warmup_epochs`` unwatched ones (cuDNN
    autotuning, allocator). Returns (criterion, epoch means of the loss terms)."""
    device = torch.device(device)
    cfg = parse_config(list(argv) + ["--dataset", "voc", "--task", "15-5", "--no_pretrained", "--backbone",
                                     "resnet18", "--norm_act", "abn", "--checkpoint", RECORDS], warn=False)
    method = build_method(cfg)
    if hasattr(method.method, "read_record"):  # STAR: the prototypes of the step before
        write_random_record(cfg, sum(classes[:-1]) - 1, iters * 2 * (32 // 16) ** 2, step=step - 1)
    precision = Precision(device.type, {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp])
    torch.manual_seed(0)
    old = build_model_from_spec(model_spec(cfg, step - 1, method), classes[:-1]).to(device).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    method.prepare_old_model(old, step)
    new = build_model_from_spec(model_spec(cfg, step, method), classes)
    load_previous_into(new, old, step)
    new.to(device)
    batches = _batches(sum(classes), iters, 32, device)
    ctx = StepContext(step=step, classes=classes, model=new, model_old=old, device=device, train_loader=batches,
                      trainer_state=trainer_state, autocast=precision.autocast, method=method)
    method.prepare_model(ctx)
    criterion = method.criterion(ctx)
    criterion.before_step(ctx)
    method.before_step(ctx)
    optimizer = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    setup = EpochSetup(criterion=criterion, optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                       scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"), precision=precision,
                       n_old=ctx.n_old, n_new=ctx.n_new, log_interval=log_interval, hooks=method)
    epochs = warmup_epochs + 1
    for epoch in range(warmup_epochs):
        method.begin_epoch(epoch, epochs)
        train_one_epoch(new, old, batches, setup, step=step, epoch=epoch, device=device)
    method.begin_epoch(warmup_epochs, epochs)
    with watch if watch is not None else contextlib.nullcontext():
        means = train_one_epoch(new, old, batches, setup, step=step, epoch=warmup_epochs, device=device)
    return criterion, means


def previous_state(argv: list[str], step: int, *, amp: str = "off", device: str = "cpu") -> dict:
    """What a term sees of the previous step at ``step`` 2: a step-1 run's ``trainer_state`` (EWC/RW/PI statistics),
    as run.py hands it over through the checkpoint; {} at step 1."""
    if step == 1:
        return {}
    criterion, _ = train_epoch(argv, 1, [3, 2], {}, iters=2, log_interval=2, amp=amp, device=device)
    return criterion.state_dict()


def audit(argv: list[str], step: int = 1, *, iters: int = 4, log_interval: int = 2, amp: str = "off") -> list[Sync]:
    """Synchronising operations of ``iters`` CPU training iterations of the method given by ``argv``."""
    import logging

    logging.getLogger("methods").setLevel(logging.ERROR)
    state = previous_state(argv, step, amp=amp)
    recorder = HostSyncRecorder()
    train_epoch(argv, step, [3, 2] if step == 1 else [3, 2, 2], state, iters=iters, log_interval=log_interval,
                amp=amp, watch=recorder)
    return recorder.syncs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--args", action="append", default=None,
                   help="run.py method flags of one configuration (repeatable); default: every preset, RCIL and "
                        "DropClass")
    p.add_argument("--step", type=int, default=1, choices=[1, 2], help="step of the --args configurations")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--log_interval", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    args = p.parse_args(argv)
    runs = [(shlex.split(a), args.step) for a in args.args] if args.args else PRESET_RUNS + PLUGIN_RUNS
    rows, bad = [], 0
    for flags, step in runs:
        syncs = audit(flags, step, iters=args.iters, log_interval=args.log_interval, amp=args.amp)
        extra = outside_logging(syncs)
        bad += bool(extra)
        where = collections.Counter(f"{s.file}:{s.line} {s.function} ({s.op.split('.')[1]})" for s in extra)
        rows.append([" ".join(flags), step, len(syncs) - len(extra),
                     "; ".join(f"{n}x {w}" for w, n in where.items()) or "none"])
    print(f"# host synchronisations in {args.iters} training iterations (log every {args.log_interval}), "
          f"amp {args.amp}")
    print()
    print(markdown_table(["configuration", "step", "in logging", "outside logging"], rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
