"""Weight transfer into the new classifier of a step (reference table 3.4): MiB's initialisation (``--orig_init``,
``--init_balanced``) and AWT's masked transfer from the background classifier, on any model whose last classifier
ends in a 1x1 convolution (``modules.heads.final_layer``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from modules.heads import final_layer


@torch.no_grad()
def init_new_classifier(model: nn.Module, *, channel_mask: torch.Tensor | None = None, orig_init: bool = False,
                        copy: bool = False, copy_bias: bool = False,
                        source: tuple[nn.Conv2d, int] | None = None) -> None:
    """Initialise ``cls[-1]`` from the background classifier ``w_bg = cls[0].weight[0]``, ``b_bg = cls[0].bias[0]``
    (``source = (layer, row)``: from that row of another 1x1 layer instead, e.g. SSUL's unknown classifier).

    Same order of operations as the reference, so every flag combination gives the reference result
    (``b* = b_bg - log(N_new + 1)``, computed once from the original ``b_bg``):

    1. ``orig_init``: every new weight := ``w_bg``.
    2. mask given and not ``copy``: ``W_new += w_bg * mask`` (bool ``[C]`` / ``[N_new, C]`` mask or float ``[C]``
       random-channel mask); with ``copy_bias`` also ``b_new := b*``, ``b_bg := b*``.
       ``copy``: ``W_new := where(mask, w_bg, W_new)`` (needs a bool mask; ValueError otherwise).
    3. ``orig_init``: ``b_new := b*``, ``b_bg := b*``.
    """
    if len(model.cls) < 2:
        raise ValueError("init_new_classifier needs a model with at least two classifiers (step > 0)")
    new_cls = final_layer(model.cls[-1])
    bg_cls, row = source if source is not None else (final_layer(model.cls[0]), 0)
    n_new = model.classes[-1]
    w_bg = bg_cls.weight[row].detach().clone().unsqueeze(0)  # (1, C, 1, 1)
    b_star = bg_cls.bias[row].detach().clone() - math.log(n_new + 1)
    mask = None if channel_mask is None else _normalise_mask(channel_mask, n_new, model.head_channels,
                                                             new_cls.weight.device)
    if copy and (mask is None or mask.dtype != torch.bool):
        kind = "no mask" if mask is None else f"a {mask.dtype} mask"
        raise ValueError(f"init_new_classifier(copy=True) needs a boolean channel mask, got {kind}; "
                         "use copy only with an AWT attribution mask (not --random_channels or --no_att)")

    def set_biases() -> None:
        new_cls.bias.fill_(float(b_star))
        bg_cls.bias[row] = b_star

    if orig_init:
        new_cls.weight.copy_(w_bg.expand_as(new_cls.weight))
    if mask is not None and not copy:
        new_cls.weight.add_(w_bg * mask.to(w_bg.dtype))
        if copy_bias:
            set_biases()
    elif copy:
        new_cls.weight.copy_(torch.where(mask, w_bg, new_cls.weight))
    if orig_init:
        set_biases()


def _normalise_mask(mask: torch.Tensor, n_new: int, channels: int, device: torch.device) -> torch.Tensor:
    """Return the mask as ``(1 | N_new, C, 1, 1)`` on the classifier's device."""
    if not torch.is_tensor(mask):
        raise ValueError(f"channel_mask must be a tensor, got {type(mask).__name__}")
    c = channels
    m = mask.detach().to(device)
    if m.dim() == 4 and m.shape[2:] == (1, 1):
        m = m[:, :, 0, 0]
    elif m.dim() == 3 and m.shape[1:] == (1, 1):
        m = m[:, 0, 0]
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.dim() != 2 or m.shape[1] != c or m.shape[0] not in (1, n_new):
        raise ValueError(f"channel_mask of shape {tuple(mask.shape)} does not fit {n_new} new classes x {c} "
                         f"channels; expected [{c}], [{c},1,1], [{n_new},{c}] or [{n_new},{c},1,1]")
    if m.dtype != torch.bool and not m.is_floating_point():
        m = m != 0  # integer 0/1 masks mean the same as boolean ones
    return m[:, :, None, None]
