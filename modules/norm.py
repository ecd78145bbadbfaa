"""Normalisation + activation layers ("ABN": batch norm followed by an activation) and the ``NORM_ACT`` table.

Every layer built here exposes ``.activation`` ("leaky_relu", "relu" or "identity") and ``.activation_param`` (the
leaky-ReLU slope); the residual blocks and the DeepLab head read them. The attribute is read at forward time, so
it may be changed after construction (as the In-Place ABN code does).

``NORM_ACT[name](num_features, activation="leaky_relu", activation_param=0.01)`` builds one layer:

* ``abn``: :class:`ABN`, batch norm that uses ``weight`` as the scale (same as ``inplace_abn.ABN``).
* ``iabn``: ``inplace_abn.InPlaceABN`` when the package is importable, else :class:`ABN` with ``abs_weight=True``.
  In-Place ABN scales by ``|weight| + eps`` (it must be invertible); the plain path reproduces this forward and its
  backward (d/dweight = sign(weight) * sum(xhat * dy), sign(0) = +1), so weights are interchangeable.
* ``iabn_sync``: ``inplace_abn.InPlaceABNSync(group=torch.distributed.group.WORLD)`` when the package is importable
  (the reference omitted ``group``, so its "sync" BN did not synchronise on newer stacks), else :class:`ABNSync`
  with ``abs_weight=True``.
* ``std``: :class:`BatchNormAct`, a ``torch.nn.BatchNorm2d`` followed by leaky ReLU 0.01 (the reference crashes
  with ``std``). Its state dict has ``num_batches_tracked``; pretrained loading adds the missing buffers.

Synchronisation is decided at forward time, not at build time (no ``convert_sync`` pass is needed): an
:class:`ABNSync` layer in training mode synchronises its batch statistics over the default process group when
``torch.distributed`` is initialised with a world size > 1, with ``torch.nn.SyncBatchNorm`` semantics (global mean
and biased variance for normalisation, unbiased global variance for the running estimate, gradients flowing
through the all-reduced statistics); otherwise it behaves exactly like :class:`ABN`. This mirrors
``torch.nn.SyncBatchNorm``, which also decides at forward time, so building the model before or after
``init_process_group`` gives the same result.

The plain layers keep exactly the state-dict keys ``weight, bias, running_mean, running_var`` (no
``num_batches_tracked``), the layout of the In-Place ABN ImageNet checkpoint, so it loads strictly.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:  # the compiled package is optional; any failure (missing CUDA libs, ABI mismatch) means "not available"
    if os.environ.get("CISS_DISABLE_INPLACE_ABN", "") not in ("", "0"):
        raise ImportError("disabled by CISS_DISABLE_INPLACE_ABN")
    import inplace_abn as _inplace_abn  # type: ignore
except Exception:  # noqa: BLE001
    _inplace_abn = None

HAS_INPLACE_ABN = _inplace_abn is not None
ACTIVATIONS = ("leaky_relu", "relu", "identity")


def activate(x: torch.Tensor, activation: str, activation_param: float, inplace: bool = False) -> torch.Tensor:
    """Apply the named activation (the same set of names as In-Place ABN)."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=activation_param, inplace=inplace)
    if activation == "relu":
        return F.relu(x, inplace=inplace)
    if activation == "identity":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


class ABN(nn.Module):
    """Batch norm + activation in plain PyTorch.

    ``abs_weight=False``: scale = ``weight`` (``inplace_abn.ABN``). ``abs_weight=True``: scale = ``|weight| + eps``
    (``inplace_abn.InPlaceABN``), with the sub-gradient sign(0) = +1 that In-Place ABN uses.
    """

    def __init__(self, num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01,
                 eps: float = 1e-5, momentum: float = 0.1, abs_weight: bool = False):
        super().__init__()
        _check_activation(activation)
        self.num_features = num_features
        self.activation = activation
        self.activation_param = activation_param
        self.eps = eps
        self.momentum = momentum
        self.abs_weight = abs_weight
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def scale(self) -> torch.Tensor:
        """The per-channel multiplier applied after normalisation."""
        if not self.abs_weight:
            return self.weight
        # where() rather than abs(): d/dw is +1 for w >= 0 and -1 for w < 0, exactly as In-Place ABN.
        return torch.where(self.weight < 0, -self.weight, self.weight) + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                         self.training, self.momentum, self.eps)
        return activate(y, self.activation, self.activation_param, inplace=True)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={self.activation}, "
                f"activation_param={self.activation_param}, abs_weight={self.abs_weight}")


def _distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ABNSync(ABN):
    """:class:`ABN` whose training statistics are synchronised over all processes (``nn.SyncBatchNorm`` semantics).

    Without an initialised process group of size > 1, or in eval mode, it is exactly :class:`ABN`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _distributed_world_size() <= 1:
            return super().forward(x)
        import torch.distributed.nn.functional as dist_nn  # differentiable collectives

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=torch.float32, device=x.device)
        packed = dist_nn.all_reduce(torch.cat([xf.sum(dim=dims), count]))
        total = packed[-1].detach()
        mean = packed[:-1] / total
        centred = xf - mean.view(shape)
        var = dist_nn.all_reduce(centred.pow(2).sum(dim=dims)) / total  # biased, used for normalisation
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            unbiased = var.detach() * total / max(float(total) - 1.0, 1.0)
            self.running_var.mul_(1 - m).add_(unbiased * m)
        mul = self.scale().float() * torch.rsqrt(var + self.eps)
        y = centred * mul.view(shape) + self.bias.float().view(shape)
        return activate(y.to(x.dtype), self.activation, self.activation_param, inplace=True)


class BatchNormAct(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` followed by an activation (the ``std`` option)."""

    def __init__(self, num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        _check_activation(activation)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(super().forward(x), self.activation, self.activation_param, inplace=True)


def _abn(num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01) -> nn.Module:
    return ABN(num_features, activation=activation, activation_param=activation_param, abs_weight=False)


def _iabn(num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01) -> nn.Module:
    if _inplace_abn is not None:
        return _inplace_abn.InPlaceABN(num_features, activation=activation, activation_param=activation_param)
    return ABN(num_features, activation=activation, activation_param=activation_param, abs_weight=True)


def _iabn_sync(num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01) -> nn.Module:
    if _inplace_abn is not None:
        group = dist.group.WORLD if (dist.is_available() and dist.is_initialized()) else None
        return _inplace_abn.InPlaceABNSync(num_features, activation=activation, activation_param=activation_param,
                                           group=group)
    return ABNSync(num_features, activation=activation, activation_param=activation_param, abs_weight=True)


def _std(num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01) -> nn.Module:
    return BatchNormAct(num_features, activation=activation, activation_param=activation_param)


NormActFactory = Callable[..., nn.Module]
NORM_ACT: dict[str, NormActFactory] = {"abn": _abn, "iabn": _iabn, "iabn_sync": _iabn_sync, "std": _std}

NORM_TYPES: tuple[type, ...] = (ABN, nn.modules.batchnorm._BatchNorm)
if _inplace_abn is not None:
    NORM_TYPES = NORM_TYPES + (_inplace_abn.ABN,)


def plain_fallback(name: str) -> str | None:
    """The plain class that serves ``--norm_act name`` because In-Place ABN is missing; None when nothing falls
    back."""
    if _inplace_abn is not None:
        return None
    return {"iabn": "ABN(abs_weight=True)", "iabn_sync": "ABNSync(abs_weight=True)"}.get(name)


def describe_norm_layers(model: nn.Module) -> str:
    """Which code computes the model's norm layers in this process, for the run record: the compiled inplace_abn
    package (with its version) or this file's pure-PyTorch layers, which match it to float32 rounding but not bit for
    bit, or torch's BatchNorm."""
    kinds = set()
    for module in model.modules():
        if not is_norm_layer(module):
            continue
        cls = type(module)
        if cls.__module__.split(".")[0] == "inplace_abn":
            kinds.add(f"inplace_abn {getattr(_inplace_abn, '__version__', '(unknown version)')} {cls.__name__}")
        elif isinstance(module, ABN):
            kinds.add(f"pure-PyTorch {cls.__name__}" + (" (|weight| + eps scale, as InPlaceABN)"
                                                          if module.abs_weight else ""))
        else:
            kinds.add(f"torch {cls.__name__}")
    return ", ".join(sorted(kinds)) or "none"


def is_norm_layer(module: nn.Module) -> bool:
    """True for every normalisation layer this framework can build (ours, torch BN, In-Place ABN)."""
    return isinstance(module, NORM_TYPES)
