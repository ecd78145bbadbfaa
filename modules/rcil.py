"""RCIL's representation compensation (Zhang et al., CVPR 2022; zhangchbin/RCIL b9aad58): twin branches and their
fold into one conv.

* :class:`TwinResidualBlock`: the In-Place ABN layout block whose 3x3 conv + norm has a twin (``conv2_new`` /
  ``bn2_new`` of a bottleneck; ``conv1_new`` / ``bn1_new`` of a basic block, our extension so that ResNet-18 runs
  it). In training every output channel takes branch 1, branch 2 or their mean, with probability 1/3 each (one draw
  per block and forward, shared by the batch: RCIL's drop-path); in evaluation the mean. Norm layers carry no
  activation (RCIL's ``activation_param=1.0``); LeakyReLU(0.01) follows the first norm, the branch mix and the
  residual sum, as in RCIL.
* :class:`TwinDeeplabV3`: the reference ASPP with a twin set of its four convs and their norm, mixed the same way.
* :func:`merge_twins`: at the start of a step > 0 each pair is folded into the first conv
  (``k = k1 t1 + k2 t2``, ``b = (beta1/2 - mu1 t1 + t1 c1) + (same for 2)``, ``t = (gamma/2) / sqrt(var + eps)``,
  ``gamma`` = ``|gamma| + eps`` for In-Place ABN's scale), the first norm becomes the identity (eps 0) and both are
  frozen and kept in evaluation mode, while the twin trains on.

The folded conv has a bias; every twin conv is built with a zero, frozen bias so that the keys are the same before
and after a merge.

Registered parts: the residual block kind ``twin`` (:data:`modules.registry.BLOCKS`: the backbone option
``block="twin"`` of the In-Place ABN ResNets, with the stem's norm without activation and ImageNet files adapted by
:func:`twin_state`) and the head ``twin_deeplabv3``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.deeplab import ASPP_DILATIONS, DeeplabV3
from modules.misc import pick
from modules.norm import NORM_ACT
from modules.registry import BLOCKS, HEADS, BlockKind, ShapeSpec

SLOPE = 0.01  # RCIL's explicit LeakyReLU


def drop_path_weights(channels: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RCIL's per-channel weights of the two branches: r ~ U(0, 1) per channel; r < 0.33: (1, 0);
    0.33 <= r < 0.66: (0, 1); else (0.5, 0.5). Shapes (1, C, 1, 1). Drawn on ``device`` (RCIL draws on the CPU and
    copies, one host-to-device copy per block and iteration)."""
    r = torch.rand(1, channels, 1, 1, device=device)
    first = torch.where(r < 0.33, 1.0, torch.where(r < 0.66, 0.0, 0.5))
    second = torch.where(r < 0.33, 0.0, torch.where(r < 0.66, 1.0, 0.5))
    return first, second


def mix(b1: torch.Tensor, b2: torch.Tensor, training: bool) -> torch.Tensor:
    if not training:
        return 0.5 * b1 + 0.5 * b2
    w1, w2 = drop_path_weights(b1.shape[1], b1.device)
    return b1 * w1.to(b1.dtype) + b2 * w2.to(b2.dtype)


def _biased_conv(*args, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(*args, bias=True, **kwargs)
    nn.init.zeros_(conv.bias)
    conv.bias.requires_grad_(False)  # zero until a merge writes the folded bias
    return conv


class _Merged(nn.Module):
    """A module whose main branch can be merged: the ``merged`` buffer travels with checkpoints, and a merged
    module keeps its main norm(s) in evaluation mode with eps 0 (the identity) after every ``train()`` and load."""

    def __init__(self):
        super().__init__()
        self.register_buffer("merged", torch.zeros((), dtype=torch.uint8))
        self.is_merged = False  # the buffer's value on the host: train() must not read a device tensor
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync(from_buffer=True))

    def main_norms(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _sync(self, from_buffer: bool = False) -> None:
        if from_buffer:
            self.is_merged = bool(int(self.merged))
        if self.is_merged:
            for norm in self.main_norms():
                norm.eps = 0.0
                norm.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._sync()
        return self


class TwinResidualBlock(_Merged):
    """See the module docstring. Keys: the reference block's ``convs.*`` and ``proj_*``, plus the twin
    (``convs.conv2_new`` / ``convs.bn2_new``; basic blocks ``convs.conv1_new`` / ``convs.bn1_new``) and ``merged``."""

    def __init__(self, in_channels: int, channels: Sequence[int], norm_act: Callable[..., nn.Module],
                 stride: int = 1, dilation: int = 1, last: bool = False):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) entries, got {channels}")
        self.last = last
        self.bottleneck = len(channels) == 3

        def norm(c):
            return norm_act(c, activation="identity")

        def conv3x3(cin, cout, s, twin):
            make = _biased_conv if twin else (lambda *a, **k: nn.Conv2d(*a, bias=False, **k))
            return make(cin, cout, 3, stride=s, padding=dilation, dilation=dilation)

        if self.bottleneck:
            self.twin = "2"
            layers = [("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)), ("bn1", norm(channels[0])),
                      ("conv2", conv3x3(channels[0], channels[1], stride, True)), ("bn2", norm(channels[1])),
                      ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)), ("bn3", norm(channels[2])),
                      ("conv2_new", conv3x3(channels[0], channels[1], stride, False)),
                      ("bn2_new", norm(channels[1]))]
        else:
            self.twin = "1"
            layers = [("conv1", conv3x3(in_channels, channels[0], stride, True)), ("bn1", norm(channels[0])),
                      ("conv2", conv3x3(channels[0], channels[1], 1, False)), ("bn2", norm(channels[1])),
                      ("conv1_new", conv3x3(in_channels, channels[0], stride, False)),
                      ("bn1_new", norm(channels[0]))]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)
            self.proj_bn = norm(channels[-1])
        else:
            self.proj_conv = None
            self.proj_bn = None

    def pairs(self) -> list[tuple[nn.Conv2d, nn.Module, nn.Conv2d, nn.Module]]:
        """(main conv, main norm, twin conv, twin norm)."""
        c, k = self.convs, self.twin
        return [(getattr(c, f"conv{k}"), getattr(c, f"bn{k}"), getattr(c, f"conv{k}_new"), getattr(c, f"bn{k}_new"))]

    def main_norms(self) -> Sequence[nn.Module]:
        return [self.pairs()[0][1]]

    def forward(self, x: torch.Tensor):
        c = self.convs
        residual = self.proj_bn(self.proj_conv(x)) if self.proj_conv is not None else x
        if self.bottleneck:
            h = F.leaky_relu(c.bn1(c.conv1(x)), SLOPE)
            y = mix(c.bn2(c.conv2(h)), c.bn2_new(c.conv2_new(h)), self.training)
            pre = c.bn3(c.conv3(F.leaky_relu(y, SLOPE))) + residual
        else:
            y = mix(c.bn1(c.conv1(x)), c.bn1_new(c.conv1_new(x)), self.training)
            pre = c.bn2(c.conv2(F.leaky_relu(y, SLOPE))) + residual
        out = F.leaky_relu(pre, SLOPE, inplace=not self.last)
        return (out, pre) if self.last else out


class TwinDeeplabV3(DeeplabV3, _Merged):
    """The reference DeepLab-v3 head with RCIL's twin ASPP convs (``map_convs_new``, ``map_bn_new``); norms without
    activation, LeakyReLU(0.01) after the branch mix, the pooling branch and the output norm (RCIL)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 256, out_stride: int = 16,
                 norm_act: Callable[..., nn.Module] | None = None, pooling_size: int | tuple | None = None,
                 in_feature: str | None = None):
        def identity_norm(c, **_):
            return norm_act(c, activation="identity")

        DeeplabV3.__init__(self, in_channels, out_channels, hidden_channels, out_stride, identity_norm, pooling_size,
                           in_feature)
        d = ASPP_DILATIONS[out_stride]
        self.map_convs = nn.ModuleList([_biased_conv(in_channels, hidden_channels, 1)] + [
            _biased_conv(in_channels, hidden_channels, 3, dilation=r, padding=r) for r in d])
        self.map_convs_new = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden_channels, 3, bias=False, dilation=r, padding=r) for r in d])
        self.map_bn_new = identity_norm(hidden_channels * 4)
        gain = nn.init.calculate_gain("leaky_relu", 1.0)  # RCIL initialises with its norms' activation (slope 1)
        for conv in [*self.map_convs, *self.map_convs_new]:
            nn.init.xavier_normal_(conv.weight, gain)
        for n in (self.map_bn_new,):
            nn.init.ones_(n.weight)
            nn.init.zeros_(n.bias)
        self.hidden = hidden_channels

    def pairs(self):
        return [(conv, (self.map_bn, slice(i * self.hidden, (i + 1) * self.hidden)), twin,
                 (self.map_bn_new, slice(i * self.hidden, (i + 1) * self.hidden)))
                for i, (conv, twin) in enumerate(zip(self.map_convs, self.map_convs_new))]

    def main_norms(self) -> Sequence[nn.Module]:
        return [self.map_bn]

    def forward(self, features) -> torch.Tensor:
        x = pick(features, self.in_feature)
        out = self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1))
        twin = self.map_bn_new(torch.cat([conv(x) for conv in self.map_convs_new], dim=1))
        out = self.red_conv(F.leaky_relu(mix(out, twin, self.training), SLOPE))
        pool = self.global_pooling_bn(self.global_pooling_conv(self._global_pooling(x)))
        pool = self.pool_red_conv(F.leaky_relu(pool, SLOPE))
        if pool.shape[-2:] != out.shape[-2:]:
            pool = pool.expand(-1, -1, out.shape[2], out.shape[3])
        return F.leaky_relu(self.red_bn(out + pool), SLOPE)


@HEADS.register("twin_deeplabv3")
def build_twin_deeplabv3(spec, shapes: dict[str, ShapeSpec], in_feature: str) -> TwinDeeplabV3:
    shape = shapes[in_feature]
    return TwinDeeplabV3(shape.channels, spec.head_channels, spec.head_channels, out_stride=shape.stride,
                         norm_act=NORM_ACT[spec.norm_act], pooling_size=spec.pooling, in_feature=in_feature)


def twin_state(state: dict, own: dict) -> dict:
    """The ImageNet state of the reference layout for a backbone with twin branches: each twin gets a copy of the
    pretrained 3x3 conv and norm it doubles (RCIL's loader), and the merge state and the zero biases of the twinned
    convs come from the new backbone."""
    out = dict(state)
    for key in own:
        if "_new." in key:
            source = key.replace("_new.", ".")
            if source in state:
                out[key] = state[source]
        elif key not in state and (key.endswith("merged") or key.endswith(".bias")):
            out[key] = own[key]
    return out


BLOCKS.add("twin", BlockKind(TwinResidualBlock, stem_activation="identity", adapt_pretrained=twin_state))


# ------------------------------------------------------------------------------------------------ the fold
def _scale(norm: nn.Module) -> torch.Tensor:
    """The effective scale of a norm layer: ``|gamma| + eps`` for In-Place ABN's (ABN with ``abs_weight``, or the
    inplace_abn package's InPlaceABN*), ``gamma`` otherwise."""
    w = norm.weight.detach()
    if getattr(norm, "abs_weight", False) or type(norm).__name__.startswith("InPlaceABN"):
        return w.abs() + norm.eps
    return w


def fold(conv: nn.Conv2d, norm, half: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``half * norm(conv(x))`` in evaluation mode as one conv; ``norm`` may be ``(norm,
    channel slice)`` for a norm shared by several convs."""
    norm, part = norm if isinstance(norm, tuple) else (norm, slice(None))
    gamma = _scale(norm)[part] * half
    beta = norm.bias.detach()[part] * half
    t = gamma / torch.sqrt(norm.running_var[part] + norm.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(t)
    return conv.weight.detach() * t[:, None, None, None], beta - norm.running_mean[part] * t + t * bias


def twin_modules(model: nn.Module) -> Iterator[_Merged]:
    return (m for m in model.modules() if isinstance(m, _Merged))


@torch.no_grad()
def merge_twins(model: nn.Module) -> int:
    """Fold every pair into its main conv, make the main norm the identity and freeze both (see the module
    docstring). Returns the number of modules merged."""
    count = 0
    for module in twin_modules(model):
        for conv, norm, twin, twin_norm in module.pairs():
            w1, b1 = fold(conv, norm)
            w2, b2 = fold(twin, twin_norm)
            conv.weight.copy_(w1 + w2)
            conv.bias.copy_(b1 + b2)
            conv.weight.requires_grad_(False)
            conv.bias.requires_grad_(False)
        for norm in module.main_norms():
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
            norm.weight.requires_grad_(False)
            norm.bias.requires_grad_(False)
        module.merged.fill_(1)
        module.is_merged = True
        module._sync()
        count += 1
    return count

