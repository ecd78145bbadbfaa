"""init_new_classifier reproduces every row of reference table 3.4 (behaviour.md) exactly."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods.transfer import init_new_classifier  # noqa: E402
from segmentation_module import make_model  # noqa: E402

C = 16  # head channels (256 in the real model; the rules do not depend on it)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 2], head_channels=C)


@pytest.fixture
def model(base_model):
    """A fresh copy with known classifier weights: cls[0] set by hand, cls[1] the default random init."""
    import copy

    m = copy.deepcopy(base_model)
    with torch.no_grad():
        m.cls[0].weight.copy_(torch.arange(3 * C, dtype=torch.float32).view(3, C, 1, 1) / 10 - 1)
        m.cls[0].bias.copy_(torch.tensor([0.5, -0.25, 0.75]))
    return m


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items() if k.startswith("cls.")}


def w_bg(s):
    return s["cls.0.weight"][0]  # (C, 1, 1)


def b_star(s, n_new=2):
    return s["cls.0.bias"][0] - math.log(n_new + 1)


def mask_bool():
    m = torch.zeros(C, dtype=torch.bool)
    m[[1, 4, 5, 11]] = True
    return m


def check_untouched_old(m, s, bg_bias):
    """cls[0] keeps its weights and its non-background biases; the background bias is ``bg_bias``."""
    assert torch.equal(m.cls[0].weight, s["cls.0.weight"])
    assert torch.equal(m.cls[0].bias[1:], s["cls.0.bias"][1:])
    torch.testing.assert_close(m.cls[0].bias[0], bg_bias)


def test_orig_init_is_mib(model):
    s = snapshot(model)
    init_new_classifier(model, orig_init=True)
    assert torch.equal(model.cls[1].weight, w_bg(s).expand(2, C, 1, 1))
    torch.testing.assert_close(model.cls[1].bias, b_star(s).expand(2))
    check_untouched_old(model, s, b_star(s))


@pytest.mark.parametrize("shape", [(C,), (C, 1, 1)])
def test_att_mask_adds_bg_weight_on_channels(model, shape):
    s = snapshot(model)
    mask = mask_bool()
    init_new_classifier(model, channel_mask=mask.view(shape))
    expected = s["cls.1.weight"] + w_bg(s) * mask.float().view(1, C, 1, 1)
    torch.testing.assert_close(model.cls[1].weight, expected)
    assert torch.equal(model.cls[1].bias, s["cls.1.bias"])  # random bias kept
    check_untouched_old(model, s, s["cls.0.bias"][0])
    off = ~mask
    assert torch.equal(model.cls[1].weight[:, off], s["cls.1.weight"][:, off])


def test_att_copy_bias(model):
    s = snapshot(model)
    mask = mask_bool()
    init_new_classifier(model, channel_mask=mask, copy_bias=True)
    torch.testing.assert_close(model.cls[1].weight, s["cls.1.weight"] + w_bg(s) * mask.float().view(1, C, 1, 1))
    torch.testing.assert_close(model.cls[1].bias, b_star(s).expand(2))
    check_untouched_old(model, s, b_star(s))


def test_att_copy(model):
    s = snapshot(model)
    mask = mask_bool()
    init_new_classifier(model, channel_mask=mask, copy=True)
    w = model.cls[1].weight
    assert torch.equal(w[:, mask], w_bg(s)[mask].unsqueeze(0).expand(2, -1, 1, 1))
    assert torch.equal(w[:, ~mask], s["cls.1.weight"][:, ~mask])
    assert torch.equal(model.cls[1].bias, s["cls.1.bias"])
    check_untouched_old(model, s, s["cls.0.bias"][0])


def test_orig_init_with_att_doubles_bg_weight_on_mask(model):
    s = snapshot(model)
    mask = mask_bool()
    init_new_classifier(model, channel_mask=mask, orig_init=True)
    w = model.cls[1].weight
    torch.testing.assert_close(w[:, mask], (2 * w_bg(s)[mask]).unsqueeze(0).expand(2, -1, 1, 1))
    torch.testing.assert_close(w[:, ~mask], w_bg(s)[~mask].unsqueeze(0).expand(2, -1, 1, 1))
    torch.testing.assert_close(model.cls[1].bias, b_star(s).expand(2))
    check_untouched_old(model, s, b_star(s))


def test_orig_init_with_att_and_copy_bias_applies_b_star_once(model):
    s = snapshot(model)
    init_new_classifier(model, channel_mask=mask_bool(), orig_init=True, copy_bias=True)
    torch.testing.assert_close(model.cls[1].bias, b_star(s).expand(2))
    check_untouched_old(model, s, b_star(s))


def test_random_channels_float_mask(model):
    s = snapshot(model)
    mask = torch.zeros(C)
    mask[[0, 3, 9]] = 1.0
    init_new_classifier(model, channel_mask=mask)
    torch.testing.assert_close(model.cls[1].weight, s["cls.1.weight"] + w_bg(s) * mask.view(1, C, 1, 1))
    assert torch.equal(model.cls[1].bias, s["cls.1.bias"])
    check_untouched_old(model, s, s["cls.0.bias"][0])


def test_no_att_or_missing_mask_changes_nothing(model):
    s = snapshot(model)
    init_new_classifier(model)
    for k, v in snapshot(model).items():
        assert torch.equal(v, s[k]), k


@pytest.mark.parametrize("shape", [(2, C), (2, C, 1, 1)])
def test_per_class_masks(model, shape):
    s = snapshot(model)
    masks = torch.zeros(2, C, dtype=torch.bool)
    masks[0, [1, 2]] = True
    masks[1, [2, 7, 8]] = True
    init_new_classifier(model, channel_mask=masks.view(shape))
    for k in range(2):
        expected = s["cls.1.weight"][k] + w_bg(s) * masks[k].float().view(C, 1, 1)
        torch.testing.assert_close(model.cls[1].weight[k], expected)
    assert torch.equal(model.cls[1].bias, s["cls.1.bias"])
    model2 = model  # copy with per-class masks
    s2 = snapshot(model2)
    init_new_classifier(model2, channel_mask=masks, copy=True)
    for k in range(2):
        assert torch.equal(model2.cls[1].weight[k, masks[k]], w_bg(s2)[masks[k]])
        assert torch.equal(model2.cls[1].weight[k, ~masks[k]], s2["cls.1.weight"][k, ~masks[k]])


def test_copy_without_bool_mask_is_a_clear_error(model):
    s = snapshot(model)
    with pytest.raises(ValueError, match="boolean channel mask"):
        init_new_classifier(model, copy=True)
    with pytest.raises(ValueError, match="boolean channel mask"):
        init_new_classifier(model, channel_mask=torch.ones(C), copy=True)
    for k, v in snapshot(model).items():  # nothing half-done
        assert torch.equal(v, s[k]), k


def test_bad_mask_shape_and_step0(model):
    with pytest.raises(ValueError, match="does not fit"):
        init_new_classifier(model, channel_mask=torch.ones(C + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        init_new_classifier(model, channel_mask=torch.ones(3, C, dtype=torch.bool))
    torch.manual_seed(0)
    step0 = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3], head_channels=C)
    with pytest.raises(ValueError, match="at least two"):
        init_new_classifier(step0, orig_init=True)


def test_only_last_classifier_changes_with_three_steps():
    torch.manual_seed(0)
    m = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 1, 1], head_channels=C)
    s = snapshot(m)
    init_new_classifier(m, orig_init=True)
    assert torch.equal(m.cls[1].weight, s["cls.1.weight"]) and torch.equal(m.cls[1].bias, s["cls.1.bias"])
    assert torch.equal(m.cls[2].weight, w_bg(s).unsqueeze(0))
    torch.testing.assert_close(m.cls[2].bias, (s["cls.0.bias"][0] - math.log(2)).expand(1))
    assert all(p.requires_grad for p in m.cls.parameters())
