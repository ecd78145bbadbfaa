"""Our plain ABN (abs_weight=True) gives the same forward and backward as inplace_abn.InPlaceABN on the same weights.

Skipped when the compiled ``inplace_abn`` package is not installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

inplace_abn = pytest.importorskip("inplace_abn")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import modules.norm as norm  # noqa: E402
from modules.norm import ABN, NORM_ACT  # noqa: E402
from segmentation_module import make_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)


def _pair(activation, weight, bias, running_mean, running_var):
    ours = ABN(weight.numel(), activation=activation, activation_param=0.01, abs_weight=True).to(DEVICE)
    theirs = inplace_abn.InPlaceABN(weight.numel(), activation=activation, activation_param=0.01).to(DEVICE)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            layer.running_mean.copy_(running_mean)
            layer.running_var.copy_(running_var)
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_forward_backward_match_inplace_abn(activation, training):
    torch.manual_seed(0)
    c = 5
    weight = torch.tensor([0.8, -1.3, 0.0, 2.0, -0.05], device=DEVICE)
    # zero weight with zero bias: In-Place ABN recovers xhat = (y - bias) / (|w| + eps) in its backward, which is
    # exact only when no large bias is added to a tiny (eps-scaled) signal
    bias = torch.tensor([0.1, -0.4, 0.0, 0.2, 0.3], device=DEVICE)
    rm = torch.randn(c, device=DEVICE) * 0.1
    rv = torch.rand(c, device=DEVICE) + 0.5
    ours, theirs = _pair(activation, weight, bias, rm, rv)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, c, 7, 6, device=DEVICE) * 1.5 + 0.3
    dy = torch.randn_like(x)

    x1 = x.clone().requires_grad_(True)
    y1 = ours(x1)
    y1.backward(dy)

    x2 = x.clone().requires_grad_(True)
    y2 = theirs(x2.clone())  # InPlaceABN overwrites its input: give it a non-leaf copy
    y2.backward(dy)

    torch.testing.assert_close(y1, y2, **TOL)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_factories_use_the_package():
    assert isinstance(NORM_ACT["iabn"](4), inplace_abn.InPlaceABN)
    assert isinstance(NORM_ACT["iabn_sync"](4), inplace_abn.InPlaceABNSync)
    assert isinstance(NORM_ACT["abn"](4), ABN)


def test_whole_model_weights_interchangeable(monkeypatch):
    torch.manual_seed(0)
    with_pkg = make_model(backbone="resnet18", norm_act="iabn", output_stride=16, classes=[3, 2]).to(DEVICE)
    monkeypatch.setattr(norm, "_inplace_abn", None)
    plain = make_model(backbone="resnet18", norm_act="iabn", output_stride=16, classes=[3, 2]).to(DEVICE)
    assert not any(isinstance(m, inplace_abn.ABN) for m in plain.modules())
    state = with_pkg.state_dict()
    with torch.no_grad():  # make the affine weights non-trivial, including negative values
        for k in state:
            if k.endswith(".weight") and state[k].dim() == 1:
                state[k].copy_(torch.randn_like(state[k]))
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    for training in (False, True):
        with_pkg.train(training)
        plain.train(training)
        out_pkg, _ = with_pkg(x.clone())
        out_plain, _ = plain(x.clone())
        torch.testing.assert_close(out_plain, out_pkg, atol=1e-3, rtol=1e-3)
