"""SimFormer's losses at WILSON's weak steps (weak-steps.md section 4): the base / non-base regions of WILSON's target,
the per-pixel complementary loss against MaskFormer's focal and dice on the selected pixels, the pair transfer's
gradients, the refusals, and a weak step with both killed and resumed to the same bytes."""
from __future__ import annotations

import pytest
import torch

from methods.maskformer_losses import IGNORE_PROPOSAL_LOGIT, dice_loss, focal_loss
from methods.pixel_pairs import SimNet
from methods.wilson_simformer import (WeakStepTransfer, old_foreground_regions, pixel_complementary_loss,
                                      weak_step_regions)
from tests.test_wilson import _weak_args, step0, voc  # noqa: F401  (module fixtures)


def test_regions_are_confident_old_argmax_base_new_argmax_non_base_and_the_rest_ignored():
    # classes 0 (bg), 1 (old), 2, 3 (new); four pixels
    target = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.4, 0.1, 0.1], [0.3, 0.1, 0.6, 0.0], [0.1, 0.7, 0.2, 0.8]])
    labels, non_base = weak_step_regions(target.T.reshape(1, 4, 1, 4), n_old=2, conf=0.5)
    assert labels.flatten().tolist() == [0, 255, 255, 255]  # pixel 1: old argmax below the confidence
    assert non_base.flatten().tolist() == [False, False, True, True]


def test_complementary_loss_is_focal_and_dice_of_the_labelled_new_max_over_valid_pixels():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 4)  # new classes only
    img = torch.tensor([[1, 0], [1, 1], [0, 0]])  # image 2 has no new label: left out
    base = torch.rand(3, 4, 4) > 0.5
    valid = torch.rand(3, 4, 4) > 0.2
    expected = []
    for i in range(2):
        union = logits[i][img[i].bool()].amax(0).clamp_min(IGNORE_PROPOSAL_LOGIT)
        x, t = union[valid[i]][None], (~base[i])[valid[i]].float()[None]
        expected.append(20 * focal_loss(x, t, 1.0) + dice_loss(x, t, 1.0))
    got = pixel_complementary_loss(logits, img, base, valid)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_oldfg_regions_are_the_old_models_confident_foreground_and_everything_else_is_predicted():
    # old classes 0 (bg), 1, 2; logits of four pixels: bg-confident, class 2 confident, class 1 unsure, all low
    old = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 0.5, 2.0], [0.0, 0.1, -1.0], [-3.0, -3.0, -3.0]])
    labels, non_base = old_foreground_regions(old.T.reshape(1, 3, 1, 4), conf=0.5)
    assert labels.flatten().tolist() == [255, 2, 1, 255]  # sigmoid(0.1) > 0.5: base; background never is
    assert non_base.flatten().tolist() == [True, False, False, True]


def test_oldfg_puts_background_in_the_complementary_max_and_in_the_distilled_vectors():
    torch.manual_seed(0)
    n, h, w = 2, 4, 4
    logits = torch.randn(n, 4, h, w)  # bg, old 1, new 2, new 3
    old = torch.randn(n, 2, h, w)
    img = torch.tensor([[1, 0], [0, 1]])
    part = WeakStepTransfer(n_old=2, conf=0.5, comp=1.0, simnet=None, pairs=0.0, distill=0.0, points=4, func="cce",
                            student="cross", region="oldfg")
    labels, non_base = old_foreground_regions(old, 0.5)
    base = labels != 255
    expected = []
    for i in range(n):
        union = torch.maximum(logits[i, 2:][img[i].bool()].amax(0), logits[i, 0]).clamp_min(IGNORE_PROPOSAL_LOGIT)
        x, t = union.flatten()[None], (~base[i]).flatten().float()[None]
        expected.append(20 * focal_loss(x, t, 1.0) + dice_loss(x, t, 1.0))
    got = part.loss(None, old, logits, torch.randn(n, 8, h, w), img, (h, w))["loss_simformer_comp"]
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    eq7 = WeakStepTransfer(n_old=2, conf=0.5, comp=1.0, simnet=None, pairs=0.0, distill=0.0, points=4, func="cce",
                           student="cross")
    assert part.needs_pseudo_labels is False and eq7.needs_pseudo_labels is True
    # the distillation's student reads background and the new classes
    logits.requires_grad_(True)
    paired = WeakStepTransfer(n_old=2, conf=0.5, comp=0.0, simnet=SimNet(8, width=16), pairs=1.0, distill=1.0,
                              points=6, func="cce", student="cross", region="oldfg")
    out = paired.loss(None, old, logits, torch.randn(n, 8, h, w), torch.ones(n, 2), (h, w))
    out["loss_simformer_distill"].backward()
    assert logits.grad[:, 0].abs().sum() > 0 and logits.grad[:, 1].abs().sum() == 0


def test_image_resolution_upsamples_the_logits_bilinearly_and_the_regions_nearest():
    torch.manual_seed(0)
    n, h, w, size = 2, 3, 3, (12, 12)
    logits = torch.randn(n, 4, h, w)
    target = torch.rand(n, 4, h, w)
    img = torch.ones(n, 2)
    part = WeakStepTransfer(n_old=2, conf=0.5, comp=1.0, simnet=None, pairs=0.0, distill=0.0, points=4, func="cce",
                            student="cross", resolution="image")
    labels, non_base = weak_step_regions(target, 2, 0.5)
    up = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    base = (labels != 255).repeat_interleave(4, 1).repeat_interleave(4, 2)
    valid = base | non_base.repeat_interleave(4, 1).repeat_interleave(4, 2)
    expected = pixel_complementary_loss(up[:, 2:], img, base, valid)
    got = part.loss(target, torch.randn(n, 2, h, w), logits, torch.randn(n, 8, h, w), img, size)["loss_simformer_comp"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    feature = pixel_complementary_loss(logits[:, 2:], img, labels != 255, (labels != 255) | non_base)
    assert got.item() != pytest.approx(feature.item(), rel=1e-3)


def test_oldfg_acts_before_the_pseudo_labels_and_eq7_does_not(voc, step0, tmp_path, caplog):  # noqa: F811
    import run
    for region, present in (("eq7", False), ("oldfg", True)):
        caplog.clear()
        extra = ["--simformer_comp", "0.15", "--simformer_region", region, "--simformer_res", "image",
                 "--pseudo_ep", "5", "--epochs", "1"]
        with caplog.at_level("INFO"):
            assert run.main(_weak_args(voc, tmp_path / region, step0, extra)) == 0
        assert ("loss_simformer_comp=" in caplog.text) is present, region


def test_the_pair_transfer_trains_the_simnet_on_detached_embeddings_and_distils_onto_the_logits():
    torch.manual_seed(0)
    n, h, w = 4, 6, 6
    target = torch.rand(n, 4, h, w)
    target[:, :2] *= 2  # plenty of confident old pixels
    logits = torch.randn(n, 4, h, w, requires_grad=True)
    pre = torch.randn(n, 8, h, w, requires_grad=True)
    part = WeakStepTransfer(n_old=2, conf=0.5, comp=0.15, simnet=SimNet(8, width=16), pairs=1.0, distill=0.1,
                            points=10, func="cce", student="cross")
    out = part.loss(target, torch.randn(n, 2, h, w), logits, pre, torch.ones(n, 2), (h, w))
    assert set(out) == {"loss_simformer_comp", "loss_simformer_pairs", "loss_simformer_distill"}
    out["loss_simformer_pairs"].backward(retain_graph=True)
    assert pre.grad is None and logits.grad is None and part.simnet.out.weight.grad is not None
    (out["loss_simformer_comp"] + out["loss_simformer_distill"]).backward()
    assert logits.grad[:, 2:].abs().sum() > 0 and logits.grad[:, :2].abs().sum() == 0  # new classes only


@pytest.mark.parametrize("extra,message", [
    (["--simformer_points", "50"], "--simformer_pairs"),
    (["--simformer_conf", "0.7"], "--simformer_comp or --simformer_pairs"),
    (["--simformer_region", "oldfg"], "--simformer_comp or --simformer_pairs"),
    (["--simformer_pairs", "1", "--simformer_res", "image"], "--simformer_comp W"),
])
def test_simformer_flags_without_their_switch_are_refused(voc, step0, tmp_path, capsys, extra, message):  # noqa: F811
    import run
    assert run.main(_weak_args(voc, tmp_path, step0, extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_a_weak_step_with_simformer_losses_is_killed_and_resumed_to_the_same_bytes(voc, step0, tmp_path,  # noqa: F811
                                                                                 monkeypatch, caplog):
    import run
    from tests.conftest import kill_and_resume
    extra = ["--simformer_comp", "0.15", "--simformer_pairs", "1", "--simformer_points", "12"]
    with caplog.at_level("INFO"):
        assert run.main(_weak_args(voc, tmp_path / "full", step0, extra)) == 0
    assert "loss_simformer_comp=" in caplog.text and "loss_simformer_distill=" in caplog.text
    args = _weak_args(voc, tmp_path / "killed", step0, extra)
    kill_and_resume(monkeypatch, args, 2)
    a = torch.load(tmp_path / "full" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    sim_a = a["trainer_state"]["methods"]["WILSON"]["simnet"]
    sim_b = b["trainer_state"]["methods"]["WILSON"]["simnet"]
    assert all(torch.equal(sim_a[k], sim_b[k]) for k in sim_a)
