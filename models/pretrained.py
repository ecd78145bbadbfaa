"""Strict loading of an ImageNet backbone file into a backbone, shared by every backbone family."""
from __future__ import annotations

import os

import torch
from torch import nn

from utils.checkpoint import safe_load, strip_module_prefix
from utils.errors import UserError


def load_backbone_file(body: nn.Module, path: str, *, drop_prefix: str, layout: str, hint: str,
                       transform=None) -> None:
    """Load ``path`` into ``body`` strictly.

    Accepts ``{"state_dict": {...}}`` or a bare state dict, keys with or without ``module.``; drops the ImageNet
    classifier (keys starting with ``drop_prefix``); ``transform(state, body_state)`` adapts the file's state to a
    layout that extends it; adds ``num_batches_tracked`` where ``body`` has them and the file does not. Any other difference is a one-line ``UserError`` naming the first keys."""
    if not path or not os.path.isfile(path):
        raise UserError(f"pretrained backbone weights not found: {path}; {hint}")
    try:
        obj = safe_load(path, "pretrained backbone weights")
    except UserError as exc:
        raise UserError(f"{exc}; {hint}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"pretrained backbone weights {path} are not a state dict of tensors; {hint}")
    state = {k: v for k, v in strip_module_prefix(dict(state)).items() if not k.startswith(drop_prefix)}
    own = body.state_dict()
    if transform is not None:  # a family whose layout extends the file's (RCIL's twins)
        state = transform(state, own)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"{name} {len(keys)}: {show(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)) if keys]
        raise UserError(f"pretrained backbone weights {path} do not match the {layout} backbone "
                        f"({'; '.join(parts)}); check --backbone, or {hint}")
    body.load_state_dict(state, strict=True)
