"""AWT channel-mask files: reading (with shape and provenance checks), atomic writing, the scores and plot next
to them. Where a mask lives is decided by ``methods.awt.channels_path`` from the configuration."""
from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import Tensor

from methods.attribution import AttributionResult, resolve_target
from methods.base import TransferSource
from utils.errors import UserError
from utils.io import atomic_save_torch, atomic_write

log = logging.getLogger(__name__)


def scores_path(mask_path: str) -> str:
    """The scores and metadata written next to a mask file."""
    return mask_path[:-3] + "_scores.pt" if mask_path.endswith(".pt") else mask_path + "_scores.pt"


def plot_path(mask_path: str) -> str:
    return mask_path[:-3] + "_scores.png" if mask_path.endswith(".pt") else mask_path + "_scores.png"


def classifier_fingerprint(model, source: TransferSource | None = None) -> str:
    """sha1 of the transfer source's weights (the background classifier by default): identifies the old model a
    mask was computed from."""
    m = resolve_target(model, source).layer
    data = torch.cat([m.weight.detach().float().cpu().flatten(), m.bias.detach().float().cpu().flatten()])
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()


def load_mask(path: str, channels: int, n_new: int | None = None, *, model_old=None,
              source: TransferSource | None = None) -> Tensor:
    """Read a mask file: bool ``[C]`` (``n_new`` None) or ``[n_new, C]``; reference ``[..., 1, 1]`` shapes accepted.

    With ``model_old`` and a scores file next to the mask, the recorded classifier fingerprint must match."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the user's file
        raise UserError(f"cannot read the AWT channel mask {path} ({type(exc).__name__}); delete it to recompute") \
            from exc
    if not torch.is_tensor(obj):
        raise UserError(f"AWT channel mask {path} holds a {type(obj).__name__}, not a tensor; delete it to recompute")
    mask = obj
    while mask.dim() > 1 and tuple(mask.shape[-2:]) == (1, 1):
        mask = mask[..., 0, 0]
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise UserError(f"AWT channel mask {path} is not a boolean mask (dtype {mask.dtype}); delete it to "
                            "recompute")
        mask = mask != 0
    expected = (channels,) if n_new is None else (n_new, channels)
    if tuple(mask.shape) != expected:
        raise UserError(f"AWT channel mask {path} has shape {list(obj.shape)} but this model needs {list(expected)} "
                        f"({'one mask' if n_new is None else f'{n_new} new classes x'} {channels} channels); "
                        "delete it or check --task/--step/--att_per_class")
    if model_old is not None and os.path.isfile(scores_path(path)):
        try:
            meta = torch.load(scores_path(path), map_location="cpu", weights_only=True).get("meta", {})
        except Exception:  # noqa: BLE001 - the scores file is informative only
            meta = {}
        recorded = meta.get("old_classifier_sha1")
        if recorded and recorded != classifier_fingerprint(model_old, source):
            raise UserError(f"AWT channel mask {path} was computed from a different previous-step model (background "
                            "classifier fingerprint differs); delete it to recompute, or use another --channels_dir")
    return mask.cpu()


def write_mask(path: str, mask: Tensor, result: AttributionResult | None = None, meta: dict | None = None,
               *, plot: bool = False) -> None:
    """Atomically write the mask (CPU bool), the scores next to it, and optionally the PNG."""
    atomic_save_torch(mask.detach().cpu().bool(), path)
    if result is not None:
        payload = {"scores": result.scores.detach().cpu(), "n_used": result.n_used.cpu(),
                   "n_skipped": result.n_skipped.cpu(), "n_images": int(result.n_images), "meta": dict(meta or {})}
        atomic_save_torch(payload, scores_path(path))
        if plot:
            plot_scores(result.scores, mask, plot_path(path))


def plot_scores(scores: Tensor, mask: Tensor, path: str) -> None:
    """PNG of the channel scores sorted in decreasing order, selected channels marked (one curve per row)."""
    import matplotlib  # only when a plot is asked for: a slow import, and no other part needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_s = scores.detach().float().cpu().reshape(-1, scores.shape[-1])
    rows_m = mask.detach().cpu().reshape(-1, mask.shape[-1])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (s, m) in enumerate(zip(rows_s, rows_m)):
        order = torch.argsort(s, descending=True, stable=True)
        xs = torch.arange(s.numel())
        line, = ax.plot(xs, s[order], lw=1, label=f"class {i}" if rows_s.shape[0] > 1 else "score")
        sel = m[order]
        ax.scatter(xs[sel], s[order][sel], s=6, color=line.get_color(), zorder=3)
    ax.set_xlabel("channel rank")
    ax.set_ylabel("attribution score")
    ax.set_title(f"AWT channel scores ({int(rows_m[0].sum())} of {rows_m.shape[1]} selected: dots)")
    if 1 < rows_s.shape[0] <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
