"""Shared helpers of the benchmarks: device choice, synchronised timing, interleaved repeats, peak memory, the
measured matmul peak, a FLOP counter and markdown tables.

Timing rules used by every benchmark:

* every variant is warmed up first (cuDNN autotuning, torch.compile, allocator caches) and never timed then;
* on CUDA a measurement brackets the work with ``torch.cuda.synchronize()``; the work itself never synchronises;
* variants are measured in rounds (``v1 v2 v3 v1 v2 v3 ...``) in the same process on the same inputs, so a slow
  phase of a shared machine hits every variant alike; the median of the rounds is reported.
"""
from __future__ import annotations

import copy
import os
import resource
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence

import logging

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # python benchmarks/x.py: the project's packages must be importable
    sys.path.insert(0, ROOT)

from methods.star import prototype_record_path  # noqa: E402
from segmentation_module import make_model  # noqa: E402


# ----------------------------------------------------------------------------------------------- device
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def start(args) -> tuple[torch.device, bool]:
    """Device, thread count and backend flags of a benchmark run; returns (device, on_gpu)."""
    logging.getLogger("train").setLevel(logging.WARNING)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_backends(device)
    return device, device.type == "cuda"


def model_defaults(args, device: torch.device) -> None:
    """Fill ``args.backbone``, ``args.size`` and ``args.iters`` left unset: the papers' model at 512 px and 10
    iterations per timed call on GPU, ResNet-18 at 64 px and 2 iterations on CPU."""
    gpu = device.type == "cuda"
    args.backbone = args.backbone or default_backbone(device)
    args.size = args.size or (512 if gpu else 64)
    args.iters = args.iters or (10 if gpu else 2)


def default_backbone(device: torch.device) -> str:
    """ResNet-101 (the papers' model) on GPU, ResNet-18 on CPU (CPU runs report ratios only)."""
    return "resnet101" if device.type == "cuda" else "resnet18"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_backends(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning on CUDA (as run.py does unless --deterministic)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


# ----------------------------------------------------------------------------------------------- timing
def time_once(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, repeats: int = 3,
                on_measure: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds of every call of every function: ``warmup`` untimed calls each, then ``repeats`` timed rounds."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if on_measure is not None:
                on_measure(name)
            times[name].append(time_once(fn, device))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak bytes allocated by tensors since the last reset. CPU: the process's max RSS (never resets)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def step_models(classes: list[int], device, *, backbone: str, norm_act: str, output_stride: int = 16,
                seed: int = 0):
    """(new, old) models of an incremental step with shared initial weights: the frozen old model of
    ``classes[:-1]`` in eval mode and the new model it initialises; (model, None) for a single step."""
    torch.manual_seed(seed)
    kw = dict(backbone=backbone, norm_act=norm_act, output_stride=output_stride)
    if len(classes) == 1:
        return make_model(classes=classes, **kw).to(device), None
    old = make_model(classes=classes[:-1], **kw).to(device).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    new = make_model(classes=classes, **kw).to(device)
    new.load_state_dict(old.state_dict(), strict=False)
    return new, old


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------- peak FLOP/s
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs), the best of ``repeats`` batches.

    Callers measure it before and after their own timings and keep the maximum (a shared machine may be busy
    during one of the two)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, time_once(lambda: [a @ b for _ in range(inner)], device))
    return 2.0 * n ** 3 * inner / best


def conv_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5, channels: int = 256) -> float:
    """Measured FLOP/s of a large 3x3 convolution (256 -> 256 channels, 8 x 32 x 32, no grad), best of ``repeats``.

    On CPUs where the BLAS matmul does not use the widest vector units (e.g. MKL on AMD) oneDNN convolutions run
    faster than the matmul, so the CPU peak is the best of both."""
    c = channels
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(8, c, 32, 32, device=device, dtype=dtype)
    flops = 2 * 8 * c * 32 * 32 * c * 9
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(repeats):
            best = min(best, time_once(lambda: conv(x), device))
    return flops / best


def measured_peak(device: torch.device, n: int | None = None) -> tuple[float, str]:
    """(FLOP/s, label): bf16 matmul on GPU; on CPU the best of an fp32 matmul and an fp32 3x3 convolution."""
    if device.type == "cuda":
        return matmul_peak(device, torch.bfloat16, n), "bf16 matmul peak"
    small = n is not None and n < 1024  # a quick, smaller measurement (smoke tests)
    return max(matmul_peak(device, torch.float32, n), conv_peak(device, torch.float32, channels=64 if small else 256)), \
        "CPU fp32 peak (best of matmul and 3x3 conv)"


# ----------------------------------------------------------------------------------------------- FLOPs
def conv_flops(module: nn.Conv2d, out: torch.Tensor) -> int:
    """2 * MACs: every output element of a convolution costs (Cin/groups) * kh * kw multiply-adds."""
    kh, kw = module.kernel_size
    macs = out.numel() * (module.in_channels // module.groups) * kh * kw
    return 2 * macs


def linear_flops(module: nn.Linear, out: torch.Tensor) -> int:
    return 2 * out.numel() * module.in_features


class FlopCounter:
    """Forward FLOPs of the Conv2d and Linear layers of a model (2 x multiply-adds), counted with forward hooks.

    Normalisation, activations, pooling, interpolation and the losses are not counted (well under 1 % of a
    ResNet/DeepLab step). ``with FlopCounter(model) as fc: model(x)`` then ``fc.total`` (FLOPs of that forward).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.total = 0
        self.per_module: dict[str, int] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(module, nn.Conv2d):
                n = conv_flops(module, out)
            else:
                n = linear_flops(module, out)
            self.total += n
            self.per_module[name] = self.per_module.get(name, 0) + n
        return hook

    def __enter__(self) -> "FlopCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def forward_flops(model: nn.Module, shape: Sequence[int], *, train: bool = False) -> int:
    """Forward FLOPs of ``model`` on one input of ``shape`` (B, 3, H, W), summed over the batch.

    Counted on a copy on the ``meta`` device (shapes only: no arithmetic, the model's statistics untouched), in
    training mode (``train=True``: the DeepLab image pooling is a global mean, as in a training step) or eval mode
    (the old model; eval image pooling is a stride-1 average pool that keeps the feature map's size)."""
    counted = copy.deepcopy(model).to("meta").train(train)
    with torch.no_grad(), FlopCounter(counted) as fc:
        counted(torch.zeros(*shape, device="meta"))
    return fc.total


def training_step_flops(fwd_new: int, fwd_old: int = 0) -> int:
    """One training step: forward + backward of the new model (backward = 2 x forward: gradients with respect to
    the inputs and to the weights, one matmul-sized product each) plus the old model's no-grad forward."""
    return 3 * fwd_new + fwd_old


# ----------------------------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]




def write_random_record(cfg, n_classes: int, positions: float, step: int = 0, channels: int = 256) -> None:
    """STAR reads the prototype record of the previous step (written when it finished): random unit prototypes of
    ``n_classes`` old classes whose counts share ``positions`` grid positions evenly with the background, so that the
    replay draws about as many features per iteration as a run whose old classes are missing from the new data."""
    g = torch.Generator().manual_seed(0)
    record = {"classes": list(range(1, n_classes + 1)),
              "prototypes": torch.nn.functional.normalize(torch.randn(n_classes, channels, generator=g), dim=1),
              "noise": torch.full((n_classes, channels), 0.05),
              "norm_mean_and_std": torch.stack([torch.full((n_classes,), 5.0), torch.full((n_classes,), 0.5)]),
              "numbers": torch.full((n_classes + 1,), positions / (n_classes + 1), dtype=torch.float64)}
    path = prototype_record_path(cfg.checkpoint, cfg.task, cfg.dataset, cfg.name, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(record, path)
