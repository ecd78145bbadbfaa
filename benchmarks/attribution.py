"""AWT attribution: closed form (--attribution exact) against Captum LayerIntegratedGradients (the reference).

    python benchmarks/attribution.py                                   # ResNet-101, OS16, 512x512, 8 images
    python benchmarks/attribution.py --backbone resnet18 --size 128 --images 4 --device cpu   # CPU, < 3 min

Both implementations run on the same randomly initialised old model (step-0 classifier with 16 classes, like
VOC 15-1) and the same random images, whose labels hold one new-class rectangle each (--mask_att), aggregated by the
reference default (mean over images, then max over positions). Each implementation runs in its own subprocess so
that its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated`` (tensor memory); on CPU the growth of
the process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the RSS after the
model was built and a warm-up run on the first batch
(one-off kernel setup for these shapes; the timed run then starts from scratch, baseline forward included) (tracemalloc does not see torch's allocations).

Prints the time of each, the speed ratio, the peak memory, the largest score difference relative to the largest
absolute score, whether the selected channels are identical, and a markdown table row (appended to --markdown).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from methods import attribution  # noqa: E402
from methods.awt import select_top_channels  # noqa: E402
from segmentation_module import make_model  # noqa: E402

NEW_CLASS = 16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet50", "resnet101"])
    p.add_argument("--output_stride", type=int, default=16, choices=[8, 16])
    p.add_argument("--size", type=int, default=512, help="square input size (the reference crops 512)")
    p.add_argument("--images", type=int, default=8, help="number of images")
    p.add_argument("--batch_size", type=int, default=4, help="images per forward for the exact path")
    p.add_argument("--ig_steps", type=int, default=50, help="Captum interpolation steps (reference: 50)")
    p.add_argument("--ig_batch_size", type=int, default=None,
                   help="Captum internal batch size (default: all steps at once, as the reference)")
    p.add_argument("--att", type=float, default=25.0, help="percentage of channels selected")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="append the markdown row to this file")
    p.add_argument("--only", choices=["exact", "captum"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _inputs(args, device):
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.images, 3, args.size, args.size, generator=gen)
    labels = torch.zeros(args.images, args.size, args.size, dtype=torch.long)
    for i in range(args.images):
        h, w = (torch.randint(args.size // 4, args.size // 2 + 1, (2,), generator=gen)).tolist()
        y, x = (torch.randint(0, args.size - max(h, w) + 1, (2,), generator=gen)).tolist()
        labels[i, y:y + h, x:x + w] = NEW_CLASS
    return images.to(device), labels.to(device)


def _worker(args) -> None:
    """One implementation in a fresh process: time and peak memory."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = make_model(backbone=args.backbone, norm_act="abn", output_stride=args.output_stride, classes=[16]).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images, labels = _inputs(args, device)
    bs = args.batch_size if args.only == "exact" else 1
    batches = [(images[i:i + bs], labels[i:i + bs]) for i in range(0, args.images, bs)]
    # warm-up on the first batch: one-off kernel/primitive setup for these shapes is not part of the timing
    attribution.channel_importance(model, batches[:1], [NEW_CLASS], method=args.only, n_steps=args.ig_steps,
                           internal_batch_size=args.ig_batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        peak_before = _max_rss_bytes()
    t0 = time.perf_counter()
    result = attribution.channel_importance(model, batches, [NEW_CLASS], method=args.only, n_steps=args.ig_steps,
                                    internal_batch_size=args.ig_batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        peak = max(0, _max_rss_bytes() - max(base, 0))
        how = "max RSS growth (getrusage)" if _max_rss_bytes() > peak_before else "max RSS growth (getrusage, <= 0)"
    torch.save({"scores": result.scores[0].cpu(), "seconds": seconds, "peak": int(peak), "how": how}, args.out)


def _run(args, which: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{which}.pt")
        argv = [sys.executable, os.path.abspath(__file__), "--only", which, "--out", out]
        for key in ("backbone", "output_stride", "size", "images", "batch_size", "ig_steps", "ig_batch_size",
                    "device", "threads", "seed"):
            value = getattr(args, key)
            if value is not None:
                argv += [f"--{key}", str(value)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
        return torch.load(out, weights_only=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.only:
        _worker(args)
        return 0
    exact = _run(args, "exact")
    captum = _run(args, "captum")
    s_e, s_c = exact["scores"].double(), captum["scores"].double()
    scale = max(float(s_e.abs().max()), float(s_c.abs().max()), 1e-30)
    rel = float((s_e - s_c).abs().max()) / scale
    same = bool(torch.equal(select_top_channels(s_e, args.att), select_top_channels(s_c, args.att)))
    ratio = captum["seconds"] / max(exact["seconds"], 1e-9)
    mib = 1024 ** 2
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    print(f"device {gpu}; {args.backbone} OS{args.output_stride}, {args.size}x{args.size}, {args.images} images, "
          f"Captum {args.ig_steps} steps (internal batch {args.ig_batch_size or args.ig_steps})")
    print(f"exact : {exact['seconds']:.3f} s, peak memory {exact['peak'] / mib:.1f} MiB ({exact['how']})")
    print(f"captum: {captum['seconds']:.3f} s, peak memory {captum['peak'] / mib:.1f} MiB ({captum['how']})")
    print(f"speed-up {ratio:.1f}x; max |score difference| / max |score| = {rel:.2e}; "
          f"selected channels ({args.att:g} %) identical: {same}")
    row = (f"| {gpu} | {args.backbone} OS{args.output_stride} | {args.size} | {args.images} | {args.ig_steps} "
           f"| {exact['seconds']:.2f} | {captum['seconds']:.2f} | {ratio:.0f}x | {exact['peak'] / mib:.0f} "
           f"| {captum['peak'] / mib:.0f} | {rel:.1e} | {'yes' if same else 'no'} |")
    print(row)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
