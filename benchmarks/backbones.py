"""Backbones side by side: parameters, forward + backward time of a training step (model with its default head and
one 1x1 classifier of 21 classes, cross-entropy), relative to ResNet-101, and on a GPU the peak memory per image.

    python -m benchmarks.backbones                                   # CPU: ratios at equal crop
    python -m benchmarks.backbones --device cuda --size 512 --batch 8  # GPU: absolute times and memory too

Variants run interleaved in one process on the same batch (``benchmarks/common.py``); on the CPU only the ratio
to ResNet-101 is meaningful, and peak memory is not measured there (the process RSS never resets).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import (describe_device, gib, interleaved, markdown_table, median, peak_memory_bytes,
                               reset_peak_memory, start, str_list)
from models import BACKBONES
from segmentation_module import ModelSpec, build_model_from_spec

REFERENCE = "resnet101"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", type=str_list, default=["resnet101", "mit_b2", "swin_t", "convnext_t"],
                   help="comma-separated --backbone names (resnet101 is always added as the reference)")
    p.add_argument("--size", type=int, default=128, help="square crop")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    return p


def build(name: str, device: torch.device):
    family = BACKBONES.get_entry(name, "--backbone")
    spec = ModelSpec(backbone=name, norm_act="abn", output_stride=family.default_stride, head=family.default_head)
    return build_model_from_spec(spec, [21]).to(device).train()


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    device, on_gpu = start(args)
    names = [REFERENCE] + [n for n in args.backbones if n != REFERENCE]
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 21, (args.batch, args.size, args.size), device=device)
    models = {n: build(n, device) for n in names}

    def step(model):
        def run():
            logits, _ = model(images)
            F.cross_entropy(logits, labels).backward()
            model.zero_grad(set_to_none=True)
        return run

    times = interleaved({n: step(m) for n, m in models.items()}, device, repeats=args.repeats)
    memory = {}
    if on_gpu:
        for n, m in models.items():
            reset_peak_memory(device)
            step(m)()
            memory[n] = peak_memory_bytes(device) / args.batch
    ref = median(times[REFERENCE])
    rows = []
    for n, m in models.items():
        params = sum(p.numel() for p in m.parameters()) / 1e6
        t = median(times[n])
        row = [n, BACKBONES[n].default_head, f"{params:.1f} M", f"{t / ref:.2f}"]
        if on_gpu:
            row += [f"{1000 * t:.1f} ms", gib(memory[n])]
        rows.append(row)
    headers = ["backbone", "head", "parameters", f"step time / {REFERENCE}"]
    headers += ["step time", "peak memory / image"] if on_gpu else []
    print(f"{describe_device(device)}; batch {args.batch}, {args.size} px, median of {args.repeats} rounds")
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
