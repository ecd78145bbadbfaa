"""Builders shared by run.py, attribute.py, attribute_class.py and evaluate.py: config in, objects out."""
from __future__ import annotations

import os

import torch

from utils.checkpoint import check_class_layout, model_state, safe_load, step_ckpt_path
from utils.errors import UserError


def classes_for_step(cfg, step: int) -> list[int]:
    from dataset.tasks import classes_per_step

    classes = classes_per_step(cfg.dataset, cfg.task, step)
    return classes[:1] if cfg.base_weights else classes


def pretrained_path(cfg) -> str | None:
    """ImageNet weights for the backbone, or None with ``--no_pretrained``."""
    if cfg.no_pretrained:
        return None
    path = os.path.join(cfg.code_directory, "pretrained", f"{cfg.backbone}_{cfg.norm_act}.pth.tar")
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights not found: {path}; put the In-Place ABN ImageNet file there "
                        "(see pretrained/README.md) or pass --no_pretrained to train from scratch")
    return path


def build_model(cfg, step: int, *, pretrained: bool = True):
    """The segmentation model with the classifiers of ``step`` (ImageNet backbone only when asked)."""
    from segmentation_module import make_model

    return make_model(backbone=cfg.backbone, norm_act=cfg.norm_act, output_stride=cfg.output_stride,
                      classes=classes_for_step(cfg, step), pooling=cfg.pooling,
                      pretrained_path=pretrained_path(cfg) if pretrained else None)


def ckpt_path(cfg, step: int) -> str:
    return step_ckpt_path(cfg.checkpoint, cfg.task, cfg.dataset, cfg.name, step)


def previous_ckpt_path(cfg, step: int, *, first_step_of_call: bool) -> str:
    """Checkpoint of step - 1: ``--step_ckpt`` for the first step of the call, else the standard path."""
    if cfg.step_ckpt and first_step_of_call:
        return cfg.step_ckpt
    return ckpt_path(cfg, step - 1)


def load_weights(model, path: str, *, strict: bool = True, what: str = "checkpoint") -> dict:
    """Load a step checkpoint's weights into ``model``; returns the whole checkpoint dict."""
    ckpt = safe_load(path, what)
    state = model_state(ckpt, path)
    check_class_layout(state, [int(m.weight.shape[0]) for m in model.cls], path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise UserError(f"{what} {path} does not match the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (check --backbone, --norm_act, --output_stride)")
    return ckpt if isinstance(ckpt, dict) else {"model_state": state}


def load_previous_step(cfg, step: int, device, *, first_step_of_call: bool = True):
    """(frozen model of step - 1 in eval mode, its checkpoint dict). A missing file is an error, never a random
    model."""
    path = previous_ckpt_path(cfg, step, first_step_of_call=first_step_of_call)
    if not os.path.isfile(path):
        raise UserError(f"previous-step checkpoint not found: {path}; run step {step - 1} first "
                        f"(python run.py ... --step {step - 1}) or pass --step_ckpt")
    model_old = build_model(cfg, step - 1, pretrained=False)
    ckpt = load_weights(model_old, path, strict=cfg.strict_weights, what="previous-step checkpoint")
    model_old.to(device).eval()
    for p in model_old.parameters():
        p.requires_grad_(False)
    return model_old, ckpt


def load_old_model(cfg, step: int, device, *, first_step_of_call: bool = True):
    """The frozen model of step - 1 in eval mode."""
    return load_previous_step(cfg, step, device, first_step_of_call=first_step_of_call)[0]


def select_device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_step_datasets(cfg, step: int):
    """(train, val, test) incremental datasets of ``step``."""
    from dataset import build_datasets

    return build_datasets(dataset=cfg.dataset, root=cfg.data_root, task=cfg.task, step=step, overlap=cfg.overlap,
                          data_masking=cfg.data_masking, crop_size=cfg.crop_size, crop_val=cfg.crop_val,
                          cache_root=cfg.cache_root, test_on_val=cfg.test_on_val,
                          val_on_trainset=cfg.val_on_trainset, cross_val=cfg.cross_val, seed=cfg.random_seed)
