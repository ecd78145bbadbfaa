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


def safe_load(path: str, what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load(weights_only=True)`` with an explicit allow-list of the numpy types older files contain;
    ``hint`` ends the message of an unreadable file (e.g. "; pass --no_auto_resume ...")."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _refused_global(exc):
            raise UserError(f"{what} {path} holds objects outside the safe allow-list ({_unpickling_reason(exc)}); "
                            "it was not loaded; re-save it with tensors and plain Python types only") from exc
        raise UserError(f"{what} {path} is not a checkpoint ({_first_line(exc)}): the file is damaged, truncated or "
                        f"something else{hint}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{what} {path} cannot be read ({_first_line(exc)}): the file is damaged, truncated or not a "
                        f"PyTorch checkpoint{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - random bytes trip the unpickler anywhere (IndexError, KeyError, ...)
        raise UserError(f"{what} {path} is not a checkpoint ({type(exc).__name__}: {_first_line(exc)}): the file is "
                        f"damaged, truncated or something else{hint}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _refused_global(exc: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a global (a pickled object), not a broken byte stream."""
    text = str(exc)
    return "GLOBAL" in text or "Unsupported global" in text or "not an allowed global" in text


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


def check_resumable(ckpt: Any, path: str, restart: str) -> None:
    """An in-step checkpoint must carry the optimiser and schedule state to continue a step."""
    if not isinstance(ckpt, dict) or "optimizer_state" not in ckpt or "model_state" not in ckpt:
        raise UserError(f"resume checkpoint {path} has no optimizer and schedule state (a bare state dict or a "
                        "final checkpoint?): it cannot continue a step; use it as --step_ckpt (previous step) or with "
                        f"--test --ckpt, or {restart}")


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


def finite_flags(state: dict) -> tuple[list[str], torch.Tensor]:
    """``(keys, flags)``: the floating-point tensors of ``state`` and a bool tensor (on their device, no host sync),
    True where a tensor holds only finite values."""
    keys = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not keys:
        return [], torch.ones(0, dtype=torch.bool)
    device = state[keys[0]].device
    return keys, torch.stack([torch.isfinite(state[k]).all().to(device) for k in keys])


def first_nonfinite(keys: list[str], flags: torch.Tensor) -> str | None:
    """The first key whose flag is False (one host sync), else None."""
    if bool(flags.all()):
        return None
    return keys[int((~flags).nonzero()[0])]


def nonfinite_entry(state: dict) -> str | None:
    """The key of the first floating-point tensor of ``state`` holding NaN or inf, else None."""
    return first_nonfinite(*finite_flags(state))


def nonfinite_in_model(model) -> str | None:
    """The name of the first parameter or buffer of ``model`` holding NaN or inf, else None."""
    return nonfinite_entry(model.state_dict())


def save_checkpoint(path: str, **content: Any) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename); a model state with NaN/inf is refused
    (``NonFiniteState``) before anything is written."""
    state = content.get("model_state")
    if isinstance(state, dict):
        bad = nonfinite_entry(state)
        if bad is not None:
            raise NonFiniteState(f"not writing {path}: {bad} holds NaN or inf", key=bad)
    atomic_save_torch(content, path)


class NonFiniteState(UserError):
    """A model state holds NaN/inf; ``key`` names the first such tensor."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key
