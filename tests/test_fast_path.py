"""The fast path computes what the plain fp32 path computes: bf16 autocast losses within bf16 tolerance,
channels-last outputs and losses equal to contiguous ones, the device confusion matrix equal to the reference."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from methods import StepContext, build_criterion
from metrics.stream_metrics import ConfusionMatrix, metrics_from_matrix
from segmentation_module import make_model
from train import EpochSetup, Precision, _uses_after_backward, train_one_epoch
from experiment.config import parse_config

SIZE = 32
CLASSES = [3, 2]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    old = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=CLASSES[:1]).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    new = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=CLASSES)
    new.load_state_dict(old.state_dict(), strict=False)
    return new, old


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        x = torch.randn(2, 3, SIZE, SIZE, generator=g)
        y = torch.randint(0, sum(CLASSES), (2, SIZE, SIZE), generator=g)
        y[:, :3] = 255
        out.append((x, y))
    return out


def _run(models, batches, precision: Precision, method: str = "MiB") -> dict[str, float]:
    """A few real training iterations (MiB at step 1 with the old model) from the shared initial weights."""
    new, old = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    if precision.channels_last:
        new.to(memory_format=torch.channels_last)
        old.to(memory_format=torch.channels_last)
    cfg = parse_config(["--method", method, "--dataset", "voc", "--task", "15-5", "--no_pretrained"])
    ctx = StepContext(step=1, classes=CLASSES, model=new, model_old=old, device="cpu", train_loader=batches,
                      autocast=precision.autocast)
    criterion = build_criterion(cfg, ctx)
    criterion.before_step(ctx)
    optimizer = torch.optim.SGD(new.parameters(), lr=1e-3, momentum=0.9)
    setup = EpochSetup(criterion=criterion, optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                       scaler=torch.amp.GradScaler("cpu", enabled=False), precision=precision, n_old=ctx.n_old,
                       n_new=ctx.n_new, log_interval=100)
    return train_one_epoch(new, old, batches, setup, step=1, epoch=0, device=torch.device("cpu"))


def test_bf16_autocast_losses_match_fp32(models, batches):
    ref = _run(models, batches, Precision("cpu", None))
    fast = _run(models, batches, Precision("cpu", torch.bfloat16))
    assert set(ref) == set(fast) and {"loss_ce", "loss_kd"} <= set(ref)
    for key in ref:
        assert fast[key] == pytest.approx(ref[key], rel=5e-2, abs=1e-3), key


def test_channels_last_training_losses_match(models, batches):
    ref = _run(models, batches, Precision("cpu", None))
    cl = _run(models, batches, Precision("cpu", None, channels_last=True))
    for key in ref:
        assert cl[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("train_mode", [False, True])
def test_channels_last_same_outputs(models, batches, train_mode):
    model = copy.deepcopy(models[0]).train(train_mode)
    model_cl = copy.deepcopy(models[0]).train(train_mode).to(memory_format=torch.channels_last)
    x = batches[0][0]
    with torch.no_grad():
        ref, ref_extras = model(x, ret_intermediate=True)
        out, extras = model_cl(x.contiguous(memory_format=torch.channels_last), ret_intermediate=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(extras["body"], ref_extras["body"], atol=1e-4, rtol=1e-4)


def test_grad_scale_only_read_when_a_term_needs_it(models, batches):
    new, old = models
    ctx = StepContext(step=1, classes=CLASSES, model=new, model_old=old)
    mib = build_criterion(parse_config(["--method", "MiB", "--dataset", "voc", "--task", "15-5"]), ctx)
    assert not _uses_after_backward(mib)
    assert _uses_after_backward(object())  # unknown criterion: keep the scale

    class Term:
        def after_backward(self, model, grad_scale=1.0):
            return {}

    class Crit:
        terms = [Term()]

    assert _uses_after_backward(Crit())


def _reference_hist(preds: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    hist = np.zeros((n, n), dtype=np.int64)
    for p, g in zip(preds, labels):
        g, p = g.ravel().astype(np.int64), p.ravel().astype(np.int64)
        keep = (g >= 0) & (g < n)
        hist += np.bincount(n * g[keep] + p[keep], minlength=n * n).reshape(n, n)
    return hist


def test_device_confusion_matrix_equals_reference():
    n = 5
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(n, "cpu")
    all_p, all_g = [], []
    for _ in range(3):
        pred = rng.integers(0, n, size=(4, 17, 13))
        gt = rng.integers(0, n + 2, size=(4, 17, 13))  # n and n+1: classes not seen yet, excluded
        gt[rng.random(gt.shape) < 0.2] = 255
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
        all_p.append(pred)
        all_g.append(gt)
    ref = _reference_hist(np.concatenate(all_p), np.concatenate(all_g), n)
    assert ref.sum() > 0
    np.testing.assert_array_equal(cm.reduce().matrix(), ref.astype(np.float64))


def test_metrics_from_matrix_by_hand():
    # rows: ground truth, columns: prediction; class 2 never in the ground truth
    hist = np.array([[3, 1, 0],
                     [2, 4, 0],
                     [0, 0, 0]], dtype=np.float64)
    res = metrics_from_matrix(hist)
    iou0 = 3 / (4 + 5 - 3)
    iou1 = 4 / (6 + 5 - 4)
    assert res["Class IoU"][0] == pytest.approx(iou0, abs=1e-5)
    assert res["Class IoU"][1] == pytest.approx(iou1, abs=1e-5)
    assert res["Class IoU"][2] == "X"
    assert res["Mean IoU"] == pytest.approx((iou0 + iou1) / 2, abs=1e-5)
    assert res["Overall Acc"] == pytest.approx(7 / 10)
    assert res["Mean Acc"] == pytest.approx((3 / 4 + 4 / 6) / 2, abs=1e-5)
