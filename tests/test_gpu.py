"""The fast path on a CUDA GPU. Skipped where no GPU is visible (CI has none); run them on a GPU machine with

    python -m pytest -q tests/test_gpu.py

Mixed precision against fp32, channels-last against contiguous, the device confusion matrix against the reference,
the training loop free of host synchronisations outside the logging iterations (checked by CUDA's own sync
debug mode, the GPU counterpart of tests/test_host_sync.py), the GPU code paths of the benchmarks and run.py.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import inspect
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import smoke_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_tf32():
    """Exact fp32 arithmetic for comparisons (cuDNN convolutions use TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_confusion_matrix_on_cuda_equals_reference():
    from benchmarks.evaluation import reference_matrix
    from metrics.stream_metrics import ConfusionMatrix

    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 21, (4, 64, 64), generator=g).cuda() for _ in range(3)]
    labels = []
    for _ in range(3):
        lab = torch.randint(0, 25, (4, 64, 64), generator=g)  # 21-24: unseen classes, excluded like 255
        lab[torch.rand(lab.shape, generator=g) < 0.1] = 255
        labels.append(lab.cuda())
    cm = ConfusionMatrix(21, "cuda")
    for p, t in zip(preds, labels):
        cm.update(p, t)
    assert cm.mat.device.type == "cuda"
    np.testing.assert_array_equal(cm.reduce().matrix(), reference_matrix(preds, labels, 21))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_losses_match_fp32(amp):
    from benchmarks.host_sync import train_epoch

    with no_tf32():
        _, ref = train_epoch(["--method", "MiB"], 1, [3, 2], {}, iters=2, log_interval=2, device="cuda")
        _, fast = train_epoch(["--method", "MiB"], 1, [3, 2], {}, iters=2, log_interval=2, amp=amp, device="cuda")
    assert set(fast) == set(ref) == {"loss_ce", "loss_kd"}
    for key in ref:
        assert fast[key] == pytest.approx(ref[key], rel=5e-2, abs=1e-3), key


@pytest.mark.parametrize("train_mode", [False, True])
def test_channels_last_same_outputs_on_cuda(train_mode):
    from segmentation_module import make_model

    torch.manual_seed(0)
    model = make_model(backbone="resnet18", norm_act="iabn", output_stride=16, classes=[16, 5]).cuda()
    model.train(train_mode)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with no_tf32():
        a, _ = model(x)
        b, _ = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def _logging_lines() -> set[tuple[str, int]]:
    """(file, line) of every line of the functions allowed to synchronise (benchmarks.host_sync.LOGGING)."""
    import importlib

    from benchmarks.host_sync import LOGGING

    lines = set()
    for file, name in LOGGING:
        module = importlib.import_module(os.path.splitext(file)[0].replace(os.sep, "."))
        source, first = inspect.getsourcelines(getattr(module, name))
        lines |= {(os.path.abspath(module.__file__), first + i) for i in range(len(source))}
    return lines


@contextlib.contextmanager
def cuda_sync_warnings(caught: list):
    """CUDA's sync debug mode: every synchronising call warns from the Python line that made it."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught.extend(w for w in records if "synchroniz" in str(w.message))


@pytest.mark.parametrize("argv,step", [(["--method", "MiB"], 1), (["--method", "PLOP"], 1),
                                       (["--method", "EWC"], 2), (["--method", "RW"], 2), (["--method", "RCIL"], 2),
                                       (["--method", "MiB", "--dropclass"], 1)],
                         ids=["MiB", "PLOP", "EWC-step2", "RW-step2", "RCIL-step2", "MiB+DropClass"])
def test_training_loop_synchronises_only_to_log_on_cuda(argv, step):
    from benchmarks.host_sync import previous_state, train_epoch

    state = previous_state(argv, step, amp="bf16", device="cuda")
    caught: list = []
    train_epoch(argv, step, [3, 2] if step == 1 else [3, 2, 2], state, iters=4, log_interval=2, amp="bf16",
                device="cuda", watch=cuda_sync_warnings(caught), warmup_epochs=1)
    allowed = _logging_lines()
    outside = [f"{w.filename}:{w.lineno}" for w in caught if (os.path.abspath(w.filename), w.lineno) not in allowed]
    assert outside == []
    assert caught, "the logging iterations read the losses: CUDA's sync debug mode reported nothing"


def test_train_step_benchmark_gpu_path(capsys):
    from benchmarks import train_step

    out = train_step.main(["--device", "cuda", "--backbone", "resnet18", "--norm_act", "iabn", "--size", "64",
                           "--batch", "4", "--iters", "2", "--repeats", "1",
                           "--variants", "fp32,bf16,fp16,bf16+cl,bf16+cl+compile"])
    for name, res in out["variants"].items():
        assert res["images_per_s"] > 0 and res["peak_memory_bytes"] > 0, name
        assert res["warmup_loss"] == pytest.approx(out["variants"]["fp32"]["warmup_loss"], rel=5e-2), name
    assert "bf16 matmul peak" in out["peak_label"] and "ms/step" in capsys.readouterr().out


def test_run_py_on_cuda_with_the_fast_path(synthetic_voc, tmp_path):
    import run

    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=[
        "--device", "cuda", "--amp", "bf16", "--channels_last", "--method", "MiB", "--name", "gpu",
        "--lr", "0.01", "0.001", "--overlap", "--num_workers", "2"])
    assert run.main(args) == 0
    with open(tmp_path / "results" / "test_voc_15-5_gpu.csv") as handle:
        rows = list(csv.reader(handle))
    assert [r[0] for r in rows] == ["0", "1"]
