"""Builders shared by run.py, attribute.py, attribute_class.py and evaluate.py: config in, objects out. The method
stack (``methods.build_method``) is built once per call and passed in."""
from __future__ import annotations

import contextlib
import json
import os

import torch

from dataset.incremental import build_step_datasets, extra_test_sets
from dataset.synthetic import is_synthetic
from dataset.tasks import classes_per_step
from methods import MethodStack
from models import BACKBONES
from modules.norm import ABN, plain_fallback
from modules.registry import HEADS
from segmentation_module import HEAD_LAYOUTS, IncrementalSegmentationModule, ModelSpec, build_model_from_spec, \
    check_spec
from train import Precision
from utils.errors import UserError
from utils.threads import cpu_budget, threads_for

__all__ = ["classes_for_step", "model_spec", "pretrained_path", "build_model", "select_device", "resolve_precision",
           "build_step_datasets", "extra_test_sets"]


def classes_for_step(cfg, step: int) -> list[int]:
    classes = classes_per_step(cfg.dataset, cfg.task, step)
    return classes[:1] if cfg.base_weights else classes


def model_spec(cfg, step: int, method: MethodStack) -> ModelSpec:
    """The model parts of ``step``: the model flags, adjusted by the method's plugins."""
    head = cfg.head or BACKBONES.get_entry(cfg.backbone, "--backbone").default_head
    rates = tuple(cfg.aspp_rates) if getattr(cfg, "aspp_rates", None) else None
    spec = method.model_spec(ModelSpec(backbone=cfg.backbone, norm_act=cfg.norm_act, output_stride=cfg.output_stride,
                                       pooling=cfg.pooling, head=head, aspp_rates=rates), step)
    if cfg.head and spec.head != cfg.head:
        raise UserError(f"--method {cfg.method} builds its own head ({spec.head}); drop --head {cfg.head}")
    options = {k: v for k, v in (("queries", getattr(cfg, "mask_queries", None)),
                                 ("layers", getattr(cfg, "mask_layers", None))) if v is not None}
    if options:
        if getattr(HEADS.get(spec.head), "classifies", "pixels") != "queries":
            raise UserError(f"--mask_queries / --mask_layers size a mask-classification head (--head maskformer); "
                            f"this run's head is {spec.head}: drop them")
        spec = spec.replace(head_options=tuple(sorted(options.items())))
    if rates is not None and spec.head != "deeplabv3":
        raise UserError(f"--aspp_rates sets the dilations of the deeplabv3 head; this run's head is {spec.head}: "
                        "add --head deeplabv3 or drop --aspp_rates")
    return spec


def heads_for_step(cfg, step: int, method: MethodStack) -> list[int]:
    """Output channels of each classifier of the model of ``step`` (its method's head layout)."""
    return HEAD_LAYOUTS.get_entry(model_spec(cfg, step, method).head_layout)(classes_for_step(cfg, step))


def check_model(cfg, method: MethodStack) -> None:
    """Every part the model of each step names exists and fits (stride, options): one line before anything runs."""
    for step in cfg.step:
        check_spec(model_spec(cfg, step, method))


def pretrained_path(cfg, spec: ModelSpec) -> str | None:
    """ImageNet weights for the backbone, or None with ``--no_pretrained``."""
    if cfg.no_pretrained:
        return None
    family = BACKBONES[spec.backbone]
    path = os.path.join(cfg.code_directory, "pretrained", family.pretrained_file(spec.norm_act))
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights not found: {path}; put the ImageNet file of {spec.backbone} "
                        f"({family.description}) there (see pretrained/README.md) or pass --no_pretrained to "
                        "train from scratch")
    return path


def build_model(cfg, step: int, *, method: MethodStack, pretrained: bool = True) -> IncrementalSegmentationModule:
    """The segmentation model with the classifiers of ``step`` (ImageNet backbone only when asked)."""
    spec = model_spec(cfg, step, method)
    return build_model_from_spec(spec, classes_for_step(cfg, step), pretrained_path(cfg, spec) if pretrained else None)


def log_folder(cfg) -> str:
    """``{logdir}/{task}-{dataset}/{name}``: TensorBoard events, run.log, config.json and command.txt of a run."""
    return os.path.join(cfg.logdir, f"{cfg.task}-{cfg.dataset}", cfg.name)


def data_kind(data_root: str) -> str | None:
    """``"synthetic"`` for a dataset written by ``python -m dataset.synthetic`` (its marker file), else None."""
    return "synthetic" if is_synthetic(data_root) else None


def norm_fallback_note(cfg, model) -> str | None:
    """A log line when ``--norm_act`` is served by the plain implementation instead of In-Place ABN, read from the
    built model (one whose norm layers do not come from ``--norm_act``, e.g. SSUL's torchvision ResNet with its
    ASPP head, gets none)."""
    plain = plain_fallback(cfg.norm_act)
    if plain is None or not any(isinstance(m, ABN) for m in model.modules()):
        return None
    return (f"--norm_act {cfg.norm_act}: the inplace_abn package is not installed, so {plain} is used (same forward "
            "and backward, interchangeable weights; more memory than In-Place ABN)")


def select_device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def cpu_threads(cfg):
    """``with cpu_threads(cfg) as note:`` runs the block with torch's intra-op threads set as
    :func:`configure_threads` decides (``note`` says how), and gives the caller its thread count back after."""
    previous = torch.get_num_threads()
    try:
        yield configure_threads(cfg)
    finally:
        torch.set_num_threads(previous)


def configure_threads(cfg) -> str:
    """Set torch's intra-op threads for this process: ``--threads`` when given, else ``OMP_NUM_THREADS`` when set
    (torchrun sets 1 for several processes per machine), else the CPU budget of the process (affinity and cgroup
    quota) shared by the job's processes on this machine and less their data-loader workers. Returns what was
    decided, for the log."""
    if cfg.threads:
        threads, why = cfg.threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        budget, how = cpu_budget()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads = threads_for(budget, local, cfg.num_workers)
        why = (f"{how}; {local} process{'es' if local > 1 else ''} of the job here, {cfg.num_workers} data-loader "
               f"worker{'s' if cfg.num_workers != 1 else ''} each; --threads N overrides")
    torch.set_num_threads(threads)
    return f"CPU threads per process: {threads} ({why})"


def resolve_precision(cfg, device: torch.device) -> Precision:
    """``--amp`` wins; else ``--opt_level`` O1/O2 mean fp16 autocast on GPU (apex is gone), fp32 on CPU."""
    mode = cfg.amp or ("fp16" if cfg.opt_level in ("O1", "O2") and device.type == "cuda" else "off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    if dtype is torch.float16 and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on the CPU")
    return Precision(device.type, dtype, cfg.channels_last)
