"""Builders shared by run.py, attribute.py, attribute_class.py and evaluate.py: config in, objects out."""
from __future__ import annotations

import json
import os

import torch

from dataset.incremental import build_step_datasets
from dataset.synthetic import is_synthetic
from dataset.tasks import classes_per_step
from methods import MethodStack, build_method
from models import BACKBONES
from modules.heads import final_layer
from modules.norm import plain_fallback
from segmentation_module import HEAD_LAYOUTS, IncrementalSegmentationModule, ModelSpec, build_model_from_spec
from train import Precision
from utils.checkpoint import check_class_layout, model_state, nonfinite_entry, safe_load, step_ckpt_path
from utils.errors import UserError

__all__ = ["classes_for_step", "model_spec", "pretrained_path", "build_model", "ckpt_path", "previous_ckpt_path",
           "load_weights", "load_previous_step", "load_old_model", "select_device", "resolve_precision",
           "build_step_datasets"]


def classes_for_step(cfg, step: int) -> list[int]:
    classes = classes_per_step(cfg.dataset, cfg.task, step)
    return classes[:1] if cfg.base_weights else classes


def model_spec(cfg, step: int, method: MethodStack | None = None) -> ModelSpec:
    """The model family of ``step``: the model flags, adjusted by the method's plugins."""
    spec = ModelSpec(backbone=cfg.backbone, norm_act=cfg.norm_act, output_stride=cfg.output_stride,
                     pooling=cfg.pooling)
    return (method or build_method(cfg)).model_spec(spec, step)


def heads_for_step(cfg, step: int, method: MethodStack | None = None) -> list[int]:
    """Output channels of each classifier of the model of ``step`` (its method's head layout)."""
    return HEAD_LAYOUTS[model_spec(cfg, step, method).head_layout](classes_for_step(cfg, step))


def pretrained_path(cfg, spec: ModelSpec | None = None) -> str | None:
    """ImageNet weights for the backbone, or None with ``--no_pretrained``."""
    if cfg.no_pretrained:
        return None
    spec = spec or model_spec(cfg, 0)
    family = BACKBONES[spec.backbone]
    path = os.path.join(cfg.code_directory, "pretrained", family.pretrained_file(spec.norm_act))
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights not found: {path}; put the ImageNet file of {spec.backbone} "
                        f"({family.description}) there (see pretrained/README.md) or pass --no_pretrained to "
                        "train from scratch")
    return path


def build_model(cfg, step: int, *, pretrained: bool = True,
                method: MethodStack | None = None) -> IncrementalSegmentationModule:
    """The segmentation model with the classifiers of ``step`` (ImageNet backbone only when asked)."""
    spec = model_spec(cfg, step, method)
    return build_model_from_spec(spec, classes_for_step(cfg, step), pretrained_path(cfg, spec) if pretrained else None)


def ckpt_path(cfg, step: int) -> str:
    return step_ckpt_path(cfg.checkpoint, cfg.task, cfg.dataset, cfg.name, step)


def log_folder(cfg) -> str:
    """``{logdir}/{task}-{dataset}/{name}``: TensorBoard events, run.log, config.json and command.txt of a run."""
    return os.path.join(cfg.logdir, f"{cfg.task}-{cfg.dataset}", cfg.name)


def data_kind(data_root: str) -> str | None:
    """``"synthetic"`` for a dataset written by ``python -m dataset.synthetic`` (its marker file), else None."""
    return "synthetic" if is_synthetic(data_root) else None


def norm_fallback_note(cfg) -> str | None:
    """A log line when ``--norm_act`` is served by the plain implementation instead of In-Place ABN (and the model
    uses --norm_act at all: torchvision-layout backbones with the ASPP head do not)."""
    norm_act = cfg.norm_act
    spec = model_spec(cfg, 0)
    plain = plain_fallback(norm_act)
    if plain is None or (spec.backbone.startswith("tv_") and spec.head != "deeplabv3"):
        return None
    return (f"--norm_act {norm_act}: the inplace_abn package is not installed, so {plain} is used (same forward "
            "and backward, interchangeable weights; more memory than In-Place ABN)")


def previous_ckpt_path(cfg, step: int, *, first_step_of_call: bool) -> str:
    """Checkpoint of step - 1: ``--step_ckpt`` for the first step of the call, else the standard path."""
    if cfg.step_ckpt and first_step_of_call:
        return cfg.step_ckpt
    return ckpt_path(cfg, step - 1)


# Flags that change the model's layout; a checkpoint that records other values does not fit (named before loading).
MODEL_FLAGS = ("backbone", "norm_act", "output_stride")
_NONFINITE_ADVICE = {
    "previous-step checkpoint": "retrain the previous step (--overwrite) or give another --step_ckpt",
    "step checkpoint": "no result is computed from it; retrain the step (--overwrite)",
}


def _saved_config(ckpt) -> dict:
    try:
        return json.loads(ckpt["config"]) if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), str) else {}
    except ValueError:
        return {}


def _family_of(state: dict) -> str:
    """A guess of the backbone a state dict was built with, from its keys (for messages)."""
    tv = [k for k in state if k.startswith("body.layer")]
    if tv:
        blocks = tuple(1 + max(int(k.split(".")[2]) for k in tv if k.startswith(f"body.layer{i}."))
                       for i in range(1, 5) if any(k.startswith(f"body.layer{i}.") for k in tv))
        return {(2, 2, 2, 2): "tv_resnet18", (3, 4, 6, 3): "tv_resnet50", (3, 4, 23, 3): "tv_resnet101"}.get(
            blocks, "a torchvision-layout ResNet")
    blocks = tuple(sum(1 for k in state if k.startswith(f"body.mod{i}.block") and k.endswith("convs.conv1.weight"))
                   for i in range(2, 6))
    return {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}.get(
        blocks, "an unknown backbone")


def check_model_flags(ckpt, cfg, path: str, what: str) -> None:
    """The model flags the checkpoint's stored configuration records must be this run's (no model needed)."""
    saved = _saved_config(ckpt)
    for flag in MODEL_FLAGS:
        if flag in saved and saved[flag] != getattr(cfg, flag):
            raise UserError(f"{what} {path} was trained with --{flag} {saved[flag]}, this run builds "
                            f"--{flag} {getattr(cfg, flag)}: pass --{flag} {saved[flag]} or another checkpoint")


def check_compatible(ckpt, state: dict, model, cfg, path: str, what: str, strict: bool = True) -> None:
    """One line naming what differs between a checkpoint and the model this run builds, before loading it: the
    model flags the checkpoint records, the classes per step, then keys and shapes."""
    if cfg is not None:
        check_model_flags(ckpt, cfg, path, what)
    check_class_layout(state, [int(final_layer(m).weight.shape[0]) for m in model.cls], path)
    own = model.state_dict()
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    if shapes or missing or unexpected:
        parts = [f"{name} {len(keys)} (first {keys[0]})" for name, keys in
                 (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)) if keys]
        here = f"--backbone {cfg.backbone} --norm_act {cfg.norm_act}" if cfg is not None else "this model"
        raise UserError(f"{what} {path} does not fit the model of this run ({here}): {'; '.join(parts)}; it looks "
                        f"like a {_family_of(state)} checkpoint: check --backbone, --norm_act and --method")


def load_weights(model, path: str, *, strict: bool = True, what: str = "checkpoint", cfg=None) -> dict:
    """Load a step checkpoint's weights into ``model`` after checking that they fit it and are finite; returns the
    whole checkpoint dict."""
    ckpt = safe_load(path, what)
    state = model_state(ckpt, path)
    check_compatible(ckpt, state, model, cfg, path, what, strict)
    bad = nonfinite_entry(state)
    if bad is not None:
        advice = _NONFINITE_ADVICE.get(what, "retrain it")
        raise UserError(f"{what} {path} holds NaN or inf ({bad}), written before this check existed: {advice}")
    model.load_state_dict(state, strict=False)
    return ckpt if isinstance(ckpt, dict) else {"model_state": state}


def load_previous_step(cfg, step: int, device, *, first_step_of_call: bool = True,
                       method: MethodStack | None = None):
    """(frozen model of step - 1 in eval mode, prepared by the method as the step's teacher; its checkpoint dict).
    A missing file is an error, never a random model."""
    path = previous_ckpt_path(cfg, step, first_step_of_call=first_step_of_call)
    if not os.path.isfile(path):
        raise UserError(f"previous-step checkpoint not found: {path}; run step {step - 1} first "
                        f"(python run.py ... --step {step - 1}) or pass --step_ckpt")
    method = method or build_method(cfg)
    model_old = build_model(cfg, step - 1, pretrained=False, method=method)
    ckpt = load_weights(model_old, path, strict=cfg.strict_weights, what="previous-step checkpoint", cfg=cfg)
    model_old.to(device).eval()
    for p in model_old.parameters():
        p.requires_grad_(False)
    method.prepare_old_model(model_old, step)
    return model_old, ckpt


def load_old_model(cfg, step: int, device, *, first_step_of_call: bool = True, method: MethodStack | None = None):
    """The frozen model of step - 1 in eval mode."""
    return load_previous_step(cfg, step, device, first_step_of_call=first_step_of_call, method=method)[0]


def select_device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(cfg, device: torch.device) -> Precision:
    """``--amp`` wins; else ``--opt_level`` O1/O2 mean fp16 autocast on GPU (apex is gone), fp32 on CPU."""
    mode = cfg.amp or ("fp16" if cfg.opt_level in ("O1", "O2") and device.type == "cuda" else "off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    if dtype is torch.float16 and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on the CPU")
    return Precision(device.type, dtype, cfg.channels_last)
