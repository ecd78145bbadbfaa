"""DropClass's drop path (Chu et al., NeurIPS 2021; sanghyeokchu/DropClass 0787087, lib/models/seg_hrnet.py), on
the classifier input ``A`` of a DeepLab-v3 model.

With 1x1 classifiers of weights ``W`` (one row per class), the Grad-CAM importance of channel ``d`` for class ``c`` is
``W[c, d]`` at every pixel, so the class-specific features are ``A * relu(W_c)``. The drop path averages them over
the kept classes and maps the result through ``g`` (1x1 conv with bias, norm, ReLU):

    S = sum_c keep_c relu(W_c) / sum_c keep_c          (one value per channel; gradients reach W through it)
    A_drop = g(A * S)

and the same classifiers read ``A_drop``. Inference goes through the drop path with every class kept.

``frozen_rows`` (class-incremental steps, ``rows="frozen"``): the importance rows of the classes of earlier steps,
fixed when their step ended (:meth:`DropClassPath.freeze_rows`), so that adding classifiers moves ``S`` only by the
new classes' share instead of re-weighting every old class's features with the drifting current weights.

Registered as the classifier wrapper ``dropclass`` (options ``readout`` and ``rows``); the model keeps it under
``drop`` (checkpoint keys ``drop.conv.*``, ``drop.bn.*``, ``drop.frozen_rows``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.norm import NORM_ACT
from modules.registry import CLASSIFIER_WRAPPERS, ClassifierWrapper

READOUTS = ("drop", "plain")  # what the model outputs in evaluation mode
ROWS = ("frozen", "live")


class DropClassPath(ClassifierWrapper):
    """``transform(A (B, D, h, w), weights (C, D), keep (C,) or None) -> A_drop (B, D, h, w)``; as a classifier
    wrapper, ``forward`` gives the plain path's logits in training (the drop path's in ``extras["drop_logits"]`` and
    ``["drop_logits_small"]``, with the classes of ``keep``, bool (C,), default all) and ``readout``'s in evaluation.

    ``readout``: the path the model answers with in evaluation mode ("drop": DropClass's inference; "plain": the
    classifiers on ``A``, e.g. for a teacher or when DropClass is off at this step). ``train_drop``: whether the
    training forward computes the drop path. Both are plain attributes that a method sets per step."""

    state_key = "drop"

    def __init__(self, channels: int, norm_act: Callable[..., nn.Module], *, n_frozen: int = 0,
                 readout: str = "drop"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.conv = nn.Conv2d(channels, channels, 1, bias=True)
        self.bn = norm_act(channels, activation="identity")
        nn.init.normal_(self.conv.weight, std=0.001)  # DropClass's init of every conv
        nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.register_buffer("frozen_rows", torch.zeros(n_frozen, channels))
        self.readout = readout
        self.train_drop = True
        self._loaded_rows = 0  # rows of frozen_rows holding values: all after loading this step's checkpoint

    # ------------------------------------------------------------------ importance
    def rows(self, weights: torch.Tensor) -> torch.Tensor:
        """relu'd importance row of every class (C, D): frozen rows first, the live weights after them."""
        live = F.relu(weights)
        n = self.frozen_rows.shape[0]
        if n == 0:
            return live
        return torch.cat([self.frozen_rows.to(live.dtype), live[n:]], dim=0)

    def importance(self, weights: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``S`` (D,): the mean of the kept classes' rows."""
        rows = self.rows(weights)
        if keep is None:
            return rows.mean(dim=0)
        k = keep.to(rows.dtype)
        return (k[:, None] * rows).sum(dim=0) / k.sum()

    def transform(self, features: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None):
        s = self.importance(weights, keep)
        return F.relu(self.bn(self.conv(features * s[None, :, None, None].to(features.dtype))))

    def forward(self, features: torch.Tensor, classify: Callable, rows: Callable, size: Sequence[int],
                keep: torch.Tensor | None = None):
        if not self.training and self.readout == "drop":
            return classify(self.transform(features, rows(), keep)), {}
        logits = classify(features)
        if not (self.training and self.train_drop):
            return logits, {}
        drop_small = classify(self.transform(features, rows(), keep))
        return logits, {"drop_logits_small": drop_small,
                        "drop_logits": F.interpolate(drop_small, size=tuple(size), mode="bilinear",
                                                     align_corners=False)}

    # ------------------------------------------------------------------ class-incremental steps
    @torch.no_grad()
    def freeze_rows(self, weights: torch.Tensor) -> int:
        """Fill the frozen rows not loaded from the previous step with the current (loaded) weights' rows: the classes
        of the step that just ended. Returns how many rows were filled."""
        n = self.frozen_rows.shape[0]
        start = min(self._loaded_rows, n)
        if start < n:
            self.frozen_rows[start:n] = F.relu(weights[start:n].float())
        self._loaded_rows = n
        return n - start

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the previous step's checkpoint holds fewer frozen rows: copy them, freeze_rows() fills the rest
        key = prefix + "frozen_rows"
        stored = state_dict.get(key)
        if stored is not None and stored.shape != self.frozen_rows.shape:
            if stored.dim() == 2 and stored.shape[1] == self.frozen_rows.shape[1] and \
                    stored.shape[0] <= self.frozen_rows.shape[0]:
                with torch.no_grad():
                    self.frozen_rows[:stored.shape[0]] = stored
                self._loaded_rows = stored.shape[0]
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
                if key in missing_keys:
                    missing_keys.remove(key)
                return
        if stored is not None:
            self._loaded_rows = self.frozen_rows.shape[0]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@CLASSIFIER_WRAPPERS.register("dropclass")
def build_dropclass(spec, classes: Sequence[int], *, readout: str = "drop", rows: str = "frozen") -> DropClassPath:
    """The drop path on the head's features; with ``rows="frozen"`` the rows of every class before the last step."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    n_frozen = sum(classes[:-1]) if rows == "frozen" else 0
    return DropClassPath(spec.head_channels, NORM_ACT[spec.norm_act], n_frozen=n_frozen, readout=readout)
