"""Training-step benchmark: the framework's own training step, every precision / layout / compile variant measured
side by side in one process on the same inputs.

    python -m benchmarks.train_step                                   # GPU: ResNet-101, OS 16, 512 px, batch 8
    python -m benchmarks.train_step --batch 24 --variants fp32,bf16,bf16+cl,bf16+cl+compile
    python -m benchmarks.train_step --device cpu --size 64 --batch 8  # CPU: ResNet-18, ratios only

What is timed: ``train.train_one_epoch`` over ``--iters`` iterations of a batch already on the device (so the data
pipeline is excluded; see benchmarks/data_loader.py), with the optimiser, scheduler, GradScaler, criterion and
wrapping built by ``run.build_setup`` / ``run.wrap_for_training`` exactly as ``run.py`` builds them. ``--step 1``
(default) is MiB on VOC 15-5 step 1 (classes [16, 5]): the old model's no-grad forward, unbiased CE and unbiased
KD; ``--step 0`` is plain cross-entropy (FT) without an old model.

Variants: ``+``-joined tokens out of ``fp32`` (no autocast), ``bf16``, ``fp16`` (autocast dtype, ``fp16`` with the
GradScaler), ``cl`` (channels-last model, old model and images) and ``compile`` (``torch.compile``), e.g.
``bf16+cl+compile``. Ratios are relative to ``fp32`` (always measured first). FLOPs of one step: see
``benchmarks.common.training_step_flops`` and docs/benchmarks.md; the fraction of peak divides the achieved
FLOP/s by a bf16 matmul measured in the same run (GPU) or by the best of an fp32 matmul and an fp32 3x3
convolution (CPU, labelled as such), measured before and after the timings (the maximum is kept).
"""
from __future__ import annotations

import argparse
import copy
import gc

import torch

from benchmarks.common import (start, describe_device, forward_flops, gib, interleaved, markdown_table, model_defaults,
                               measured_peak, median, peak_memory_bytes, reset_peak_memory, step_models, str_list,
                               training_step_flops, time_once)
from experiment.config import parse_config
from methods.stack import build_method
from run import build_setup, resolve_precision, wrap_for_training
from train import train_one_epoch

TOKENS = ("fp32", "bf16", "fp16", "cl", "compile")
DEFAULT_GPU = "fp32,bf16,fp16,bf16+cl,bf16+cl+compile"
DEFAULT_CPU = "fp32,bf16,cl,bf16+cl"


def parse_variant(name: str) -> dict:
    tokens = name.split("+")
    bad = [t for t in tokens if t not in TOKENS]
    if bad:
        raise SystemExit(f"error: unknown variant token(s) {bad} in {name!r}; use + joined {', '.join(TOKENS)}")
    dtypes = [t for t in tokens if t in ("fp32", "bf16", "fp16")]
    if len(dtypes) > 1:
        raise SystemExit(f"error: variant {name!r} names more than one precision")
    return {"amp": {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[dtypes[0] if dtypes else "fp32"],
            "channels_last": "cl" in tokens, "compile": "compile" in tokens}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backbone", default=None, help="default: resnet101 on GPU, resnet18 on CPU")
    p.add_argument("--norm_act", default="iabn", help="iabn (the papers' In-Place ABN) or abn")
    p.add_argument("--output_stride", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="square crop (default 512 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="training iterations per timed call (default 10 GPU, 2 CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    p.add_argument("--step", type=int, default=1, choices=[0, 1], help="1: MiB with old model; 0: plain CE")
    p.add_argument("--variants", default=None, help=f"comma list (GPU default {DEFAULT_GPU}; CPU {DEFAULT_CPU})")
    p.add_argument("--order", default=None, choices=["interleaved", "sequential"],
                   help="interleaved rounds (default CPU) or one variant after the other, freeing memory in between "
                        "(default GPU: clean per-variant peak memory)")
    p.add_argument("--peak_n", type=int, default=None, help="matmul size for the peak (8192 GPU, 2048 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def _cfg(args, variant: dict):
    argv = ["--dataset", "voc", "--task", "15-5", "--step", str(args.step), "--method", "MiB" if args.step else "FT",
            "--backbone", args.backbone, "--norm_act", args.norm_act, "--output_stride", str(args.output_stride),
            "--no_pretrained", "--batch_size", str(args.batch), "--crop_size", str(args.size), "--epochs", "1000",
            "--amp", variant["amp"], "--no_progress", "--num_workers", "0"]
    argv += ["--channels_last"] if variant["channels_last"] else []
    argv += ["--compile"] if variant["compile"] else []
    return parse_config(argv)


def build_base(args, device):
    """Shared initial weights: the old model (step 1) and the new model it initialises (VOC 15-5)."""
    return step_models([16] if args.step == 0 else [16, 5], device, backbone=args.backbone, norm_act=args.norm_act,
                       output_stride=args.output_stride, seed=args.seed)


def build_variant(args, name: str, base_new, base_old, loader, device):
    """The training step of one variant, built the way run.py builds it; returns a callable running one epoch."""
    variant = parse_variant(name)
    cfg = _cfg(args, variant)
    precision = resolve_precision(cfg, device)
    model = copy.deepcopy(base_new)
    model_old = copy.deepcopy(base_old) if base_old is not None else None
    if model_old is not None and cfg.channels_last:
        model_old.to(memory_format=torch.channels_last)
    setup, ctx = build_setup(cfg, args.step, cfg.lr[0], model, model_old, loader, {}, precision, device,
                             method=build_method(cfg))
    setup.log_interval = len(loader)  # the loss check (one host sync) once per timed call, as at an epoch end
    setup.criterion.before_step(ctx)
    train_model = wrap_for_training(cfg, model, device)

    def run():
        return train_one_epoch(train_model, model_old, loader, setup, step=args.step, epoch=0, device=device)

    return run


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    device, gpu = start(args)
    model_defaults(args, device)
    order = args.order or ("sequential" if gpu else "interleaved")
    names = str_list(args.variants or (DEFAULT_GPU if gpu else DEFAULT_CPU))
    if "fp32" in names:
        names.remove("fp32")
    names = ["fp32"] + names
    for n in names:
        parse_variant(n)
    if not gpu and any(parse_variant(n)["amp"] == "fp16" for n in names):
        raise SystemExit("error: fp16 autocast needs a GPU (run.py refuses --amp fp16 on CPU); use bf16")

    base_new, base_old = build_base(args, device)
    g = torch.Generator().manual_seed(args.seed)
    # uint8 pixels and labels, as the loader hands them over (normalised on the device inside the timed step)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    n_classes = sum(base_new.classes)
    labels = torch.randint(0, n_classes, (args.batch, args.size, args.size), generator=g, dtype=torch.uint8)
    labels[:, :2] = 255
    loader = [(images, labels.to(device))] * args.iters

    fwd_new = forward_flops(base_new, (2, 3, args.size, args.size), train=True) // 2  # per image
    fwd_old = forward_flops(base_old, (1, 3, args.size, args.size)) if base_old is not None else 0
    step_flops = training_step_flops(fwd_new, fwd_old) * args.batch
    peak, peak_label = measured_peak(device, args.peak_n)

    times: dict[str, list[float]] = {}
    memory: dict[str, int] = {}
    warm_loss: dict[str, float] = {}

    def first_call(name, fn):
        means = fn()
        warm_loss[name] = float(sum(means.values()))

    if order == "interleaved":
        fns = {}
        for n in names:
            fn = build_variant(args, n, base_new, base_old, loader, device)
            first_call(n, fn)
            fns[n] = fn
        times = interleaved(fns, device, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
        for n in names:
            memory[n] = peak_memory_bytes(device)
        del fns
    else:
        for n in names:
            fn = build_variant(args, n, base_new, base_old, loader, device)
            first_call(n, fn)
            for _ in range(max(args.warmup - 1, 0)):
                fn()
            reset_peak_memory(device)
            times[n] = [time_once(fn, device) for _ in range(args.repeats)]
            memory[n] = peak_memory_bytes(device)
            del fn
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()

    peak = max(peak, measured_peak(device, args.peak_n)[0])  # again after the timings: keep the best
    ref = median(times["fp32"])
    rows, results = [], {}
    for n in names:
        t = median(times[n])
        per_step = t / args.iters
        achieved = step_flops / per_step
        res = {"seconds_per_step": per_step, "images_per_s": args.batch / per_step, "speedup_vs_fp32": ref / t,
               "achieved_flops": achieved, "fraction_of_peak": achieved / peak, "peak_memory_bytes": memory[n],
               "warmup_loss": warm_loss[n]}
        results[n] = res
        row = [n]
        if gpu:
            row += [f"{res['images_per_s']:.1f}", f"{per_step * 1e3:.1f}", gib(memory[n]),
                    f"{achieved / 1e12:.1f}"]
        row += [f"{res['speedup_vs_fp32']:.2f}x", f"{100 * res['fraction_of_peak']:.1f} %", f"{warm_loss[n]:.4f}"]
        rows.append(row)
    headers = ["variant"] + (["images/s", "ms/step", "peak memory", "TFLOP/s"] if gpu else []) + \
              ["speed vs fp32", f"fraction of {peak_label}", "mean loss (first call)"]
    print(f"# training step: {describe_device(device)}")
    print(f"{args.backbone} {args.norm_act} OS{args.output_stride}, {args.size}x{args.size}, batch {args.batch}, "
          f"step {args.step} ({'MiB, old model' if args.step else 'plain CE'}), {args.iters} iterations x "
          f"{args.repeats} repeats ({order}), warm-up {args.warmup}")
    print(f"FLOPs: forward {fwd_new / 1e9:.2f} GFLOP/image (new), {fwd_old / 1e9:.2f} (old); one step "
          f"{step_flops / 1e12:.3f} TFLOP (3 x new + old, x batch)")
    print(f"{peak_label}: {peak / 1e12:.2f} TFLOP/s" if gpu else f"{peak_label}: {peak / 1e9:.1f} GFLOP/s")
    if not gpu:
        print(f"CPU: ratios only; process max RSS {gib(peak_memory_bytes(device))} (all variants together)")
    print()
    print(markdown_table(headers, rows))
    return {"device": str(device), "backbone": args.backbone, "size": args.size, "batch": args.batch,
            "forward_flops_new": fwd_new, "forward_flops_old": fwd_old, "step_flops": step_flops,
            "peak_flops": peak, "peak_label": peak_label, "order": order, "variants": results}


if __name__ == "__main__":
    main()
