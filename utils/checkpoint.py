"""Checkpoint paths, safe loading and atomic saving.

Step checkpoints keep the reference layout and keys (``model_state``, ``optimizer_state``, ``scheduler_state``,
``best_score``, ``epoch``, ``trainer_state``); reference files (``module.`` keys) load here, ours are written without
the DDP prefix (docs/deviations.md). A step checkpoint exists only once its step is complete; an interrupted step
leaves a separate ``.partial.pth`` for resuming.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from utils.errors import UserError
from utils.io import atomic_save_torch

MODULE_PREFIX = "module."

# Non-tensor objects found in checkpoints saved by the reference code (numpy scores and their dtypes); they are the
# only globals unpickling may construct, so a checkpoint cannot run arbitrary code.
_NUMPY_ALLOWED = [np.dtype, np.ndarray, np.float64, np.float32, np.int64, np.int32, type(np.dtype(np.float64)),
                  type(np.dtype(np.float32)), type(np.dtype(np.int64)), type(np.dtype(np.int32))]
try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
_NUMPY_ALLOWED += [scalar, _reconstruct]
# Files written with numpy 1.x (the reference code's era) name these functions numpy.core.multiarray.*.
_NUMPY_ALLOWED += [(scalar, "numpy.core.multiarray.scalar"), (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch's weights-only refusal (which global was refused), else its first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (hits or lines or [type(exc).__name__])[0][:200]


def step_ckpt_path(checkpoint: str, task: str, dataset: str, name: str, step: int) -> str:
    """``{checkpoint}/{task}-{dataset}_{name}_{step}.pth`` (the reference name, joined safely)."""
    return os.path.join(checkpoint, f"{task}-{dataset}_{name}_{step}.pth")


def partial_ckpt_path(final_path: str) -> str:
    """The in-step (resumable) checkpoint next to a step checkpoint."""
    root, ext = os.path.splitext(final_path)
    return f"{root}.partial{ext}"


def safe_load(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with an explicit allow-list of the numpy types older files contain."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{what} {path} holds objects outside the safe allow-list ({_unpickling_reason(exc)}); "
                        "it was not loaded; re-save it with tensors and plain Python types only") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{what} {path} cannot be read ({str(exc).splitlines()[0][:200]}); "
                        "the file is damaged or not a PyTorch checkpoint") from exc


def strip_module_prefix(state: dict) -> dict:
    """Remove the DDP ``module.`` prefix that reference checkpoints carry."""
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v for k, v in state.items()}


def model_state(ckpt: Any, path: str) -> dict:
    """The model state dict of a checkpoint (reference dict or a bare state dict), without ``module.``."""
    if isinstance(ckpt, dict) and "model_state" in ckpt:
        ckpt = ckpt["model_state"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"checkpoint {path} has no model_state: it is not a step checkpoint of this framework "
                        "or of the reference code")
    return strip_module_prefix(ckpt)


def classifier_weights(state: dict) -> list[torch.Tensor]:
    """The weight of the final 1x1 conv of each ``cls.{i}`` of a model state: a plain classifier ``cls.{i}.weight``
    or the last layer of a per-step head ``cls.{i}.{k}.weight``."""
    found = []
    while True:
        prefix = f"cls.{len(found)}."
        convs = [v for k, v in state.items() if k.startswith(prefix) and k.endswith("weight")
                 and v.dim() == 4 and tuple(v.shape[2:]) == (1, 1) and len(k[len(prefix):].split(".")) <= 2]
        if not convs:
            return found
        found.append(convs[-1])  # state dicts follow module order: the final 1x1 comes last


def classes_in_state(state: dict) -> list[int]:
    """Classes per step of a model state."""
    return [int(w.shape[0]) for w in classifier_weights(state)]


def check_class_layout(state: dict, classes: list[int], path: str) -> None:
    """Raise when a checkpoint's classifiers do not match the expected classes per step."""
    found = classes_in_state(state)
    if found != list(classes):
        raise UserError(f"checkpoint {path} has classes per step {found}, expected {list(classes)}: "
                        "it was trained on another task, dataset or step (check --task, --dataset, --name)")


def save_checkpoint(path: str, **content: Any) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    atomic_save_torch(content, path)
