"""Evaluation benchmark: the confusion matrix on the device against the reference's per-image numpy bincount,
and ``train.evaluate`` under each precision / layout variant, side by side in one process.

    python -m benchmarks.evaluation                                   # GPU: 512 px, batch 8, ResNet-101 forward
    python -m benchmarks.evaluation --device cpu --size 64 --batch 8 --forward_variants fp32,bf16

Part 1 (metric only, random predictions with 255 pixels): ``metrics.stream_metrics.ConfusionMatrix`` (one
``torch.bincount`` per batch on the device, invalid pixels sent to a dropped extra bin, moved to the host once)
against the reference computation (every image copied to the host, ``np.bincount`` of ``n * gt + pred`` over valid
pixels) and against the former boolean-mask version. All matrices must be equal.

Part 2 (``--forward_variants``, empty to skip): ``train.evaluate`` over in-memory batches with the model in each
variant (``fp32``, ``bf16``, ``fp16``, ``cl``; ``+``-joined), speed relative to fp32 and pixel agreement of the
predictions with fp32.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from benchmarks.common import (start, default_backbone, describe_device, interleaved, markdown_table, median, str_list)
from benchmarks.train_step import parse_variant
from metrics.stream_metrics import ConfusionMatrix
from segmentation_module import make_model
from train import Precision, evaluate


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n_classes", type=int, default=21)
    p.add_argument("--size", type=int, default=None, help="square image side (default 512 GPU, 64 CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=None, help="batches per timed pass (default 20 GPU, 4 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbone", default=None, help="default: resnet101 on GPU, resnet18 on CPU")
    p.add_argument("--norm_act", default="iabn")
    p.add_argument("--forward_variants", default=None,
                   help="train.evaluate variants (default GPU fp32,bf16,bf16+cl; CPU fp32,bf16); '' to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def reference_matrix(preds: list[torch.Tensor], labels: list[torch.Tensor], n: int) -> np.ndarray:
    """The reference's ``_fast_hist`` per image on the host: labels outside ``[0, n)`` (255) are skipped."""
    hist = np.zeros((n, n), dtype=np.int64)
    for pred_b, gt_b in zip(preds, labels):
        pred_b, gt_b = pred_b.cpu().numpy(), gt_b.cpu().numpy()
        for p, g in zip(pred_b, gt_b):
            g, p = g.ravel(), p.ravel()
            keep = (g >= 0) & (g < n)
            hist += np.bincount(n * g[keep].astype(np.int64) + p[keep], minlength=n * n).reshape(n, n)
    return hist


def device_matrix(preds: list[torch.Tensor], labels: list[torch.Tensor], n: int, device) -> np.ndarray:
    cm = ConfusionMatrix(n, device)
    for p, g in zip(preds, labels):
        cm.update(p, g)
    return cm.reduce().mat.view(n, n).cpu().numpy()


def masked_matrix(preds: list[torch.Tensor], labels: list[torch.Tensor], n: int, device) -> np.ndarray:
    """The former ``ConfusionMatrix.update``, kept for comparison: valid pixels selected with a boolean mask (a
    ``nonzero``, so one host synchronisation per batch on CUDA, and a slow masked copy on CPU)."""
    mat = torch.zeros(n * n, dtype=torch.int64, device=device)
    for p, g in zip(preds, labels):
        g = g.to(torch.int64)
        keep = (g >= 0) & (g < n)
        mat += torch.bincount(g[keep] * n + p.to(torch.int64)[keep], minlength=n * n)
    return mat.view(n, n).cpu().numpy()


def _metric_part(args, device, gpu: bool) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.size, args.size)
    preds = [torch.randint(0, args.n_classes, shape, generator=g).to(device) for _ in range(args.batches)]
    labels = []
    for _ in range(args.batches):
        lab = torch.randint(0, args.n_classes, shape, generator=g)
        lab[torch.rand(shape, generator=g) < 0.1] = 255
        labels.append(lab.to(device))
    a = device_matrix(preds, labels, args.n_classes, device)
    b = reference_matrix(preds, labels, args.n_classes)
    c = masked_matrix(preds, labels, args.n_classes, device)
    equal = bool(np.array_equal(a, b))
    equal_masked = bool(np.array_equal(c, b))
    times = interleaved({"device": lambda: device_matrix(preds, labels, args.n_classes, device),
                         "masked": lambda: masked_matrix(preds, labels, args.n_classes, device),
                         "reference": lambda: reference_matrix(preds, labels, args.n_classes)},
                        device, warmup=1, repeats=args.repeats)
    t = {k: median(v) for k, v in times.items()}
    images = args.batch * args.batches
    labels_ = {"device": "ConfusionMatrix.update (bincount with an overflow bin, on the device)",
               "masked": "boolean-mask bincount on the device (former implementation)",
               "reference": "reference numpy per image"}
    rows = [[labels_[k]] + ([f"{images / t[k]:.0f}"] if gpu else []) + [f"{t['reference'] / t[k]:.2f}x"]
            for k in ("device", "masked", "reference")]
    print(f"## confusion matrix: {args.n_classes} classes, {images} images of {args.size}x{args.size} "
          f"(10 % ignored); equal to the reference: ConfusionMatrix {equal}, boolean-mask {equal_masked}")
    print()
    print(markdown_table(["method"] + (["images/s"] if gpu else []) + ["speed vs reference"], rows))
    print()
    return {"equal": equal, "equal_masked": equal_masked, "speedup_vs_reference": t["reference"] / t["device"],
            "masked_speedup_vs_reference": t["reference"] / t["masked"], "seconds": t}


def _forward_part(args, device, gpu: bool, names: list[str]) -> dict:
    torch.manual_seed(args.seed)
    base = make_model(backbone=args.backbone, norm_act=args.norm_act, output_stride=16,
                      classes=[args.n_classes]).to(device).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, args.n_classes, (args.batch, args.size, args.size), generator=g).to(device)
    loader = [(x, y)] * args.batches
    preds, fns = {}, {}
    for name in names:
        v = parse_variant(name)
        if v["amp"] == "fp16" and not gpu:
            raise SystemExit("error: fp16 autocast needs a GPU; use bf16")
        if v["compile"]:
            raise SystemExit("error: compile is not a variant of the evaluation benchmark")
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[v["amp"]]
        precision = Precision(device.type, dtype, v["channels_last"])
        model = copy.deepcopy(base)
        if v["channels_last"]:
            model.to(memory_format=torch.channels_last)
        with torch.no_grad(), precision.autocast():
            preds[name] = model(precision.images(x, device))[0].argmax(1)
        fns[name] = (lambda m=model, p=precision: evaluate(m, loader, n_classes=args.n_classes, device=device,
                                                            precision=p))
    times = interleaved(fns, device, warmup=1, repeats=args.repeats)
    ref = median(times[names[0]])
    rows, results = [], {}
    for name in names:
        t = median(times[name])
        agree = float((preds[name] == preds[names[0]]).float().mean())
        results[name] = {"speedup_vs_fp32": ref / t, "images_per_s": args.batch * args.batches / t,
                         "pixel_agreement": agree}
        rows.append([name] + ([f"{results[name]['images_per_s']:.1f}"] if gpu else []) +
                    [f"{ref / t:.2f}x", f"{100 * agree:.2f} %"])
    print(f"## train.evaluate: {args.backbone} {args.norm_act} OS16, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.batches} batches, {args.repeats} interleaved repeats")
    print()
    print(markdown_table(["variant"] + (["images/s"] if gpu else []) +
                         [f"speed vs {names[0]}", f"predictions equal to {names[0]}"], rows))
    return results


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    device, gpu = start(args)
    args.size = args.size or (512 if gpu else 64)
    args.batches = args.batches or (20 if gpu else 4)
    args.backbone = args.backbone or default_backbone(device)
    variants = args.forward_variants
    if variants is None:
        variants = "fp32,bf16,bf16+cl" if gpu else "fp32,bf16"
    names = str_list(variants)
    if names and names[0] != "fp32":
        names = ["fp32"] + [n for n in names if n != "fp32"]
    print(f"# evaluation: {describe_device(device)}" + ("" if gpu else " (ratios only)"))
    print()
    out = {"metric": _metric_part(args, device, gpu)}
    if names:
        out["forward"] = _forward_part(args, device, gpu, names)
    return out


if __name__ == "__main__":
    main()
