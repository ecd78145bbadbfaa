"""Method cost benchmark: one incremental training step of several methods on the same images, each with its own
model family, losses and preparation, measured side by side in one process.

    python -m benchmarks.methods                                         # GPU: ResNet-101, 512 px, batch 8
    python -m benchmarks.methods --device cpu --size 64 --batch 4 --threads 1   # CPU: ResNet-18, ratios only
    python -m benchmarks.methods --methods PLOP,RCIL,MiB
    python -m benchmarks.methods --device cpu --size 64 --batch 4 --threads 1 --methods MiB,DKD,STAR

What is timed: ``train.train_one_epoch`` over ``--iters`` iterations of a batch already on the device, at VOC 15-5
step 1 (classes [16, 5]), with the step built the way ``run.py`` builds it: the old model of the method's step-0
family (random weights, seeded), the new model loaded from it (``load_previous_into``), prepared
(``prepare_model``: RCIL folds its twins here) and its new classifier initialised, then ``run.build_setup`` and the
criterion's ``before_step`` (PLOP's pseudo-label thresholds pass, untimed). Ratios are against the first method
(``PLOP`` by default: RCIL is PLOP's successor on the same model).

Size: parameters (all, trainable), forward FLOPs of the new model per image, and the bytes of the tensors autograd
saves for the backward pass in one training forward of the batch (activation memory; the same on any device). On
a GPU the peak allocated memory of the timed step is printed too.
"""
from __future__ import annotations

import argparse
import gc
import tempfile

import torch

from benchmarks.common import (describe_device, forward_flops, gib, interleaved, markdown_table, model_defaults,
                               median, peak_memory_bytes, reset_peak_memory, start, str_list, time_once,
                               write_random_record)
from experiment.builders import build_model
from experiment.checkpoints import load_previous_into
from experiment.config import parse_config
from methods import build_method
from methods.base import StepContext
from run import build_setup, resolve_precision, wrap_for_training
from train import train_one_epoch

TASK, CLASSES = "15-5", [16, 5]
RECORDS = tempfile.mkdtemp(prefix="ciss-bench-")  # STAR's step-0 prototype record (write_random_record)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="PLOP,RCIL", help="comma list of --method names; ratios against the first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backbone", default=None, help="default: resnet101 on GPU, resnet18 on CPU")
    p.add_argument("--norm_act", default="iabn", help="iabn (the papers' In-Place ABN) or abn")
    p.add_argument("--size", type=int, default=None, help="square crop (default 512 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="training iterations per timed call (default 10 GPU, 2 CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    p.add_argument("--amp", default=None, help="autocast: off (CPU default), bf16 (GPU default), fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def method_cfg(args, method: str):
    return parse_config(["--dataset", "voc", "--task", TASK, "--step", "1", "--method", method, "--backbone",
                         args.backbone, "--norm_act", args.norm_act, "--no_pretrained", "--batch_size",
                         str(args.batch), "--crop_size", str(args.size), "--epochs", "1000", "--amp", args.amp,
                         "--no_progress", "--num_workers", "0", "--checkpoint", RECORDS], warn=False)


def build_step(args, method_name: str, loader, device):
    """The step-1 training of ``method_name`` as run.py builds it; returns (one-epoch callable, new model, cfg)."""
    cfg = method_cfg(args, method_name)
    method = build_method(cfg)
    if hasattr(method.method, "read_record"):
        write_random_record(cfg, CLASSES[0] - 1, len(loader) * args.batch * (args.size // 16) ** 2)
    torch.manual_seed(args.seed)
    model_old = build_model(cfg, 0, pretrained=False, method=method).to(device).eval()
    for p in model_old.parameters():
        p.requires_grad_(False)
    model = build_model(cfg, 1, pretrained=False, method=method)
    load_previous_into(model, model_old, 1)
    model.to(device)
    ctx = StepContext(step=1, classes=list(CLASSES), model=model, model_old=model_old, device=device, method=method)
    method.prepare_model(ctx)
    method.init_new_classifier(ctx)
    precision = resolve_precision(cfg, device)
    setup, ctx = build_setup(cfg, 1, cfg.lr[0], model, model_old, loader, {}, precision, device, method=method,
                             ctx=ctx)
    setup.log_interval = len(loader)
    setup.criterion.before_step(ctx)
    train_model = wrap_for_training(cfg, model, device)

    def run():
        return train_one_epoch(train_model, model_old, loader, setup, step=1, epoch=0, device=device)

    return run, model, cfg


def saved_activation_bytes(model, images: torch.Tensor, cfg, device) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward (each storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    precision = resolve_precision(cfg, device)
    model.train()
    x = images.float() / 255.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast():
        out = model(x)
    del out
    return total


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    device, gpu = start(args)
    model_defaults(args, device)
    args.amp = args.amp or ("bf16" if gpu else "off")
    names = str_list(args.methods)
    if len(names) < 2:
        raise SystemExit("error: --methods needs at least two methods to compare")

    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, sum(CLASSES), (args.batch, args.size, args.size), generator=g, dtype=torch.uint8)
    labels[:, :2] = 255
    loader = [(images, labels.to(device))] * args.iters

    info, fns, times, memory, warm_loss = {}, {}, {}, {}, {}
    for n in names:
        fn, model, cfg = build_step(args, n, loader, device)
        params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info[n] = {"parameters": params, "trainable": trainable,
                   "forward_flops": forward_flops(model, (2, 3, args.size, args.size), train=True) // 2,
                   "activation_bytes": saved_activation_bytes(model, images, cfg, device)}
        warm_loss[n] = float(sum(fn().values()))
        if gpu:  # one method after the other: each its own peak memory
            for _ in range(max(args.warmup - 1, 0)):
                fn()
            reset_peak_memory(device)
            times[n] = [time_once(fn, device) for _ in range(args.repeats)]
            memory[n] = peak_memory_bytes(device)
            del fn, model
            gc.collect()
            torch.cuda.empty_cache()
        else:
            fns[n] = fn
    if not gpu:
        times = interleaved(fns, device, warmup=max(args.warmup - 1, 0), repeats=args.repeats)

    ref = names[0]
    results, rows = {}, []
    for n in names:
        per_step = median(times[n]) / args.iters
        r = {**info[n], "seconds_per_step": per_step, "time_vs_first": per_step / (median(times[ref]) / args.iters),
             "warmup_loss": warm_loss[n]}
        if gpu:
            r["peak_memory_bytes"] = memory[n]
        results[n] = r
        row = [n, f"{r['time_vs_first']:.2f}x"]
        if gpu:
            row += [f"{per_step * 1e3:.1f}", gib(memory[n])]
        row += [f"{r['parameters'] / 1e6:.2f} M ({r['parameters'] / info[ref]['parameters']:.2f}x)",
                f"{r['trainable'] / 1e6:.2f} M", f"{r['forward_flops'] / 1e9:.2f}",
                f"{gib(r['activation_bytes'])} ({r['activation_bytes'] / info[ref]['activation_bytes']:.2f}x)",
                f"{warm_loss[n]:.4f}"]
        rows.append(row)
    headers = ["method", f"time per step vs {ref}"] + (["ms/step", "peak memory"] if gpu else []) + \
              ["parameters + buffers", "trainable", "forward GFLOP/image", "saved activations (batch)",
               "mean loss (first call)"]
    print(f"# methods, VOC {TASK} step 1: {describe_device(device)}")
    print(f"{args.backbone} {args.norm_act}, {args.size}x{args.size}, batch {args.batch}, autocast {args.amp}, "
          f"{args.iters} iterations x {args.repeats} repeats ({'sequential' if gpu else 'interleaved'}), "
          f"warm-up {args.warmup}")
    print()
    print(markdown_table(headers, rows))
    return {"device": str(device), "backbone": args.backbone, "size": args.size, "batch": args.batch,
            "methods": results}


if __name__ == "__main__":
    main()
