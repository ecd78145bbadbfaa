"""WILSON's losses, PAMR and pseudo-labels (methods/wilson_losses.py, modules/wilson.py) against a transcription of the
reference code (tests/reference/wilson.py, MIT), on random float64 tensors, to 1e-6 (weak-steps.md 6.2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import wilson_losses as ours
from modules.wilson import build_localizer, denormalize, pamr
from modules.norm import NORM_ACT
from tests.reference import wilson as ref

TOL = dict(rtol=1e-6, atol=1e-6)
B, N_OLD, N_NEW, H, W = 3, 4, 3, 9, 11
C = N_OLD + N_NEW


def _labels(gen, batch=B, n_new=N_NEW):
    labels = (torch.rand(batch, n_new, generator=gen, dtype=torch.float64) > 0.5).double()
    labels[:, 0] = 1  # every image holds one new class at least
    return labels


def _full(labels_new):
    """The framework's image-label vector: classes 1..C-1, old entries 0."""
    return torch.cat([torch.zeros(labels_new.shape[0], N_OLD - 1, dtype=labels_new.dtype), labels_new], 1)


@pytest.mark.parametrize("mode", ["ngwp", "att", "gap"])
def test_image_label_loss_equals_the_reference(mode):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 3
    labels = _labels(gen)
    expected = ref.bce_loss(z, labels, mode=mode, reduction="mean")
    torch.testing.assert_close(ours.image_label_loss(z, labels, mode), expected, **TOL)
    if mode == "ngwp":
        torch.testing.assert_close(ours.cam_scores(z), ref.ngwp_focal(z), **TOL)


def test_localization_prior_equals_the_reference_line():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    old = torch.randn(B, N_OLD, H, W, generator=gen, dtype=torch.float64)
    expected = F.binary_cross_entropy_with_logits(z[:, :N_OLD], torch.sigmoid(old), reduction="mean")
    torch.testing.assert_close(ours.localization_prior_loss(z, old), expected, **TOL)


@pytest.mark.parametrize("dilations", [(1, 2, 4, 8, 12), (1,), (1, 2, 4, 8, 12, 24)])
def test_pamr_equals_the_reference(dilations):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 13, 17, generator=gen, dtype=torch.float64)
    masks = torch.rand(2, C, 13, 17, generator=gen, dtype=torch.float64).softmax(1)
    module = ref.PAMR(num_iter=10, dilations=list(dilations)).double()
    torch.testing.assert_close(pamr(image, masks, dilations=dilations), module(image, masks), **TOL)
    small = torch.rand(2, C, 7, 9, generator=gen, dtype=torch.float64)  # resized to the image first
    torch.testing.assert_close(pamr(image, small, dilations=dilations), module(image, small), **TOL)


def test_denormalize_keeps_the_reference_mean():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(denormalize(images), ref.denorm(images), **TOL)


def test_pseudo_gtmask_and_binarize_equal_the_reference():
    gen = torch.Generator().manual_seed(4)
    m = torch.rand(B, C, H, W, generator=gen, dtype=torch.float64).softmax(1)
    m = ours.mask_by_image_labels(m, _full(_labels(gen)))
    expected = ref.pseudo_gtmask(m.clone(), ambiguous=True, cutoff_top=0.6, cutoff_bkg=0.7, cutoff_low=0.2)
    got = ours.pseudo_gtmask(m)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got[:, 1:N_OLD].sum() == 0, "zeroed channels never pass the 0.2 floor"
    torch.testing.assert_close(ours.binarize(m), ref.binarize(m), rtol=0, atol=0)
    tied = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    assert ours.binarize(tied).sum() == 3, "ties give several ones, as the reference"


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_targets_segmentation_and_self_training_equal_the_reference(alpha):
    gen = torch.Generator().manual_seed(5)
    int_masks = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 2
    int_masks_raw = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 2
    outputs = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    outputs_old = torch.randn(B, N_OLD, H, W, generator=gen, dtype=torch.float64)
    images = torch.randn(B, 3, 2 * H, 2 * W, generator=gen, dtype=torch.float64)
    labels_new = _labels(gen)
    l1h = _full(labels_new)
    affinity = ref.PAMR(num_iter=10, dilations=[1, 2, 4, 8, 12]).double()
    l_seg_ref, l_cls_ref = ref.weak_step_losses(int_masks, int_masks_raw, outputs, outputs_old, images, l1h, N_OLD, C,
                                                alpha, affinity)
    m = ours.mask_by_image_labels(int_masks.softmax(1), l1h)
    image = F.interpolate(denormalize(images), size=(H, W), mode="bilinear", align_corners=True)
    refined = ours.mask_by_image_labels(pamr(image, int_masks.softmax(1)), l1h)
    target, q = ours.soft_targets(m, outputs_old, alpha)
    torch.testing.assert_close(ours.segmentation_loss(outputs, target, q, labels_new), l_seg_ref, **TOL)
    l_cls = ours.balanced_self_training_loss(int_masks_raw, ours.pseudo_gtmask(refined), l1h)
    torch.testing.assert_close(l_cls, l_cls_ref, **TOL)


def test_segmentation_batch_weight_drops_an_image_whose_labelled_class_gets_no_mass():
    """At alpha = 1 a labelled class that never wins the argmax has q = 0: the image is left out (w_b = 0)."""
    logits = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    old = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    m = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
    m[1, 2] = 0.9
    target, q = ours.soft_targets(m, old, alpha=1.0)
    labels = torch.ones(2, 1, dtype=torch.float64)
    per_image = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).flatten(1).mean(-1)
    expected = per_image[1] / (1 + 1e-5)
    torch.testing.assert_close(ours.segmentation_loss(logits, target, q, labels), expected, **TOL)


def test_localizer_shape():
    loc = build_localizer(64, C, NORM_ACT["abn"])
    out = loc(torch.randn(2, 64, 5, 7))
    assert out.shape == (2, C, 5, 7)
    assert loc.conv1.bias is None and loc.classifier.bias is not None
