"""MaskFormer's matching, losses and semantic inference as SimFormer uses them, against explicit computations on tiny
tensors, and the guarantee that a novel class's pixels never reach a mask loss."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from methods.maskformer_losses import (IGNORE_PROPOSAL_LOGIT, classification_loss, complementary_loss, mask_losses,
                                       match, semantic_inference, targets_from_label)


def _focal(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2


def _dice(xs, ts) -> float:
    ps = [1 / (1 + math.exp(-x)) for x in xs]
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(4, 6, generator=g, dtype=torch.float64)  # 4 proposals, K = 5 classes + no-object
    masks_logits = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    label = np.array([[1, 1, 3], [4, 4, 255]])
    labels, masks, has_mask = targets_from_label(label, novel={4})
    return cls, masks_logits, labels, masks.double(), has_mask


def test_targets_hide_novel_masks_and_list_base_first():
    _, _, labels, masks, has_mask = _setup()
    assert labels.tolist() == [1, 3, 4] and has_mask.tolist() == [True, True, False]
    assert masks[2].sum() == 0 and masks[0].tolist() == [[1, 1, 0], [0, 0, 0]]


def test_matching_minimises_the_explicit_cost():
    cls, logits, labels, masks, has_mask = _setup()
    prob = cls.softmax(-1)

    def cost(q, j):
        c = -float(prob[q, labels[j]])
        if has_mask[j]:
            xs, ts = logits[q].flatten().tolist(), masks[j].flatten().tolist()
            c += 20 * sum(_focal(x, t) for x, t in zip(xs, ts)) / len(xs) + _dice(xs, ts)
        return c

    rows, cols = match(cls, logits, labels, masks, has_mask)
    best = min(sum(cost(q, j) for j, q in enumerate(perm)) for perm in itertools.permutations(range(4), 3))
    assert math.isclose(sum(cost(int(q), int(j)) for q, j in zip(rows, cols)), best, rel_tol=1e-9)
    assert sorted(cols.tolist()) == [0, 1, 2]


def test_classification_loss_weights_no_object_by_a_tenth():
    cls, logits, labels, masks, has_mask = _setup()
    matched = [(torch.tensor([2, 0, 3]), torch.tensor([0, 1, 2]))]
    loss = classification_loss(cls[None], matched, [labels])
    targets = {2: 1, 0: 3, 3: 4, 1: 5}  # proposal -> class (5 = no-object)
    num = den = 0.0
    for q, c in targets.items():
        w = 0.1 if c == 5 else 1.0
        num += -w * float(cls[q].log_softmax(-1)[c])
        den += w
    assert math.isclose(float(loss), num / den, rel_tol=1e-9)


def test_mask_losses_and_no_novel_pixel_reaches_them():
    cls, logits, labels, masks, has_mask = _setup()
    logits = logits.clone().requires_grad_(True)
    matched = [(torch.tensor([2, 0, 3]), torch.tensor([0, 1, 2]))]
    out = mask_losses(logits[None], matched, [masks], [has_mask])
    focal = sum(sum(_focal(x, t) for x, t in zip(logits[q].flatten().tolist(), masks[j].flatten().tolist())) / 6
                for q, j in ((2, 0), (0, 1))) / 2
    dice = sum(_dice(logits[q].flatten().tolist(), masks[j].flatten().tolist()) for q, j in ((2, 0), (0, 1))) / 2
    assert math.isclose(float(out["loss_mask_focal"].detach()), 20 * focal, rel_tol=1e-9)
    assert math.isclose(float(out["loss_mask_dice"].detach()), dice, rel_tol=1e-9)
    sum(out.values()).backward()
    assert logits.grad[3].abs().sum() == 0  # the proposal of the novel class gets no mask gradient
    assert logits.grad[2].abs().sum() > 0
    # the novel class's pixels: whatever its (hidden) mask holds, the mask losses are the same
    changed = masks.clone()
    changed[2] = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=changed.dtype)
    again = mask_losses(logits.detach()[None], matched, [changed], [has_mask])
    assert all(torch.equal(again[k], out[k].detach()) for k in out)


def test_complementary_loss_is_the_explicit_focal_dice_of_the_non_base_region():
    cls, logits, labels, masks, has_mask = _setup()
    matched = [(torch.tensor([2, 0, 3]), torch.tensor([0, 1, 2]))]
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss = complementary_loss(logits[None], matched, [masks], [has_mask], valid[None])
    xs = [max(float(v), IGNORE_PROPOSAL_LOGIT) for v in logits[3].flatten()]  # one novel proposal + the constant
    region = [0, 0, 0, 1, 1, 0]  # not class 1 or 3, and not padding
    expected = 20 * sum(_focal(x, t) for x, t in zip(xs, region)) / 6 + _dice(xs, region)
    assert math.isclose(float(loss), expected, rel_tol=1e-9)
    only_base = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]
    assert float(complementary_loss(logits[None], only_base, [masks], [has_mask])) == 0


def test_semantic_inference_sums_class_probabilities_times_masks():
    cls, logits, _, _, _ = _setup()
    out = semantic_inference(cls[None], logits[None])[0]
    for k in range(5):
        for y in range(2):
            for x in range(3):
                expected = sum(float(cls[q].softmax(-1)[k]) * float(logits[q, y, x].sigmoid()) for q in range(4))
                assert math.isclose(float(out[k, y, x]), expected, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ the model parts
def test_maskformer_head_and_wrapper_through_the_model_seam():
    from segmentation_module import make_model
    torch.manual_seed(0)
    model = make_model(backbone="tv_resnet18", norm_act="std", output_stride=32, classes=[3, 2],
                       head="maskformer").eval()
    x = torch.randn(2, 3, 64, 64)
    logits, extras = model(x, ret_intermediate=True)
    assert logits.shape == (2, 5, 64, 64) and extras["mask_cls"].shape == (2, 100, 6)
    assert extras["mask_pred"].shape == (2, 100, 16, 16) and len(extras["aux_outputs"]) == 5  # deep supervision
    # class logits: the per-step classifiers on the query embeddings, then the no-object logit
    query = extras["queries"][-1]
    wrapper = model.classifier_wrapper
    cls = torch.cat([torch.cat([c(query[0, :, :, None, None]).flatten(1) for c in model.cls], 1),
                     wrapper.no_object(query[0])], 1)
    assert torch.allclose(extras["mask_cls"][0], cls, atol=1e-5)
    # the model's logits are the log of MaskFormer's semantic scores
    scores = semantic_inference(extras["mask_cls"], extras["mask_pred"])
    assert torch.allclose(extras["sem_logits_small"], scores.clamp_min(1e-6).log(), atol=1e-5)


def test_awt_on_a_query_classifier_is_refused_in_one_line():
    from experiment.config import parse_config
    from methods import build_method
    from utils.errors import UserError
    with pytest.raises(UserError, match="maskformer head's classifiers read queries"):
        build_method(parse_config(["--dataset", "voc", "--task", "15-5", "--head", "maskformer", "--method", "MiB",
                                   "--att", "25"]))


@pytest.mark.slow
def test_a_two_step_mib_run_on_a_maskformer_model(tmp_path):
    import run
    from dataset.synthetic import generate
    from tests.conftest import smoke_args
    data = tmp_path / "voc"
    generate(str(data), "voc", size=32, n_train=24, n_val=20, seed=4)
    args = smoke_args(str(data), tmp_path, steps=(0, 1), extra=[
        "--method", "MiB", "--backbone", "tv_resnet18", "--norm_act", "std", "--head", "maskformer",
        "--output_stride", "32", "--lr", "0.01", "0.001", "--batch_size", "4"])
    assert run.main(args) == 0
    rows = (tmp_path / "results" / "test_voc_15-5_Experiment.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["0", "1"]


def test_the_set_loss_term_sums_every_decoder_layer():
    from methods.base import Batch
    from methods.mask_classification import MaskClassificationLoss
    from segmentation_module import make_model
    torch.manual_seed(0)
    model = make_model(backbone="tv_resnet18", norm_act="std", output_stride=32, classes=[6], head="maskformer")
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 6, (2, 32, 32))
    labels[:, :4] = 255
    logits, extras = model(images)
    batch = Batch(images=images, labels=labels, logits=logits, extras=extras, logits_old=None, extras_old=None,
                  n_old=0, n_new=6)
    out = MaskClassificationLoss(0.5)(batch)
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    targets = [targets_from_label(label, set()) for label in small]
    from methods.maskformer_losses import set_losses
    layers = [(extras["mask_cls"], extras["mask_pred"])] + [(a["mask_cls"], a["mask_pred"]) for a in extras["aux_outputs"]]
    expected = {}
    for cls_logits, mask_logits in layers:
        for key, value in set_losses(cls_logits, mask_logits, targets).items():
            expected[key] = expected.get(key, 0) + 0.5 * float(value.detach())
    assert set(out) == {"loss_mask_cls", "loss_mask_focal", "loss_mask_dice"} and len(layers) == 6
    assert all(math.isclose(float(out[k].detach()), expected[k], rel_tol=1e-5) for k in out)
    assert 255 not in targets[0][0].tolist()  # ignored pixels are no target
