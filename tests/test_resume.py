"""Exact resume and determinism on the CPU.

* A run killed with SIGKILL in the middle of a step and restarted with the same command ends with the same weights,
  optimiser state and results CSV as an uninterrupted run (the killed run also uses 2 loader workers, the
  uninterrupted one none: the worker count must not change results either).
* An interrupted step 1 with a regulariser (EWC) or with PLOP (pseudo-label thresholds, POD) resumes exactly too
  (in-process, crash simulated after an in-step checkpoint).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, interrupt_at_epoch, smoke_args

pytestmark = pytest.mark.slow

CKPT = "15-5-voc_Experiment_{}.pth"


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("resume_data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=40, n_val=20, seed=0)
    return str(root)


def _args(data, out, *, workers=0, steps=(0,), extra=()):
    return smoke_args(data, out, steps=steps, extra=["--epochs", "3", "--ckpt_interval", "1", "--batch_size", "4",
                                                     "--lr", "0.01", "--num_workers", str(workers),
                                                     "--print_interval", "1", *extra])


def _cmd(data, out, workers):
    return [sys.executable, os.path.join(ROOT, "run.py"), *_args(data, out, workers=workers)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _load(out, step=0):
    return torch.load(os.path.join(str(out), "ckpt", CKPT.format(step)), map_location="cpu", weights_only=True)


def _csv(out):
    with open(os.path.join(str(out), "results", "test_voc_15-5_Experiment.csv")) as handle:
        return handle.read()


def _assert_same_state(a, b, what=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
        for k in a:
            _assert_same_state(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{what}[{i}]")
    else:
        assert a == b, (what, a, b)


def _assert_same_run(a, b):
    ca, cb = _load(a), _load(b)
    # final checkpoints hold no optimiser state: equal weights and statistics after the last update say the
    # optimiser and schedule were restored exactly
    _assert_same_state(ca["model_state"], cb["model_state"], "model_state")
    _assert_same_state(ca["trainer_state"], cb["trainer_state"], "trainer_state")
    assert ca["epoch"] == cb["epoch"] == 3 and ca["best_score"] == cb["best_score"]
    assert _csv(a) == _csv(b)


def test_sigkill_mid_step_then_rerun_gives_the_uninterrupted_result(tiny_voc, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_cmd(tiny_voc, full, 0), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    # the interrupted run: 2 loader workers, killed (whole process group) once the first in-step checkpoint exists
    partial = killed / "ckpt" / CKPT.format("0").replace(".pth", ".partial.pth")
    proc = subprocess.Popen(_cmd(tiny_voc, killed, 2), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not partial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert partial.exists(), "no in-step checkpoint within the time limit"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "ckpt" / CKPT.format(0)).exists() and not (killed / "results").exists()
    assert torch.load(partial, weights_only=True)["epoch"] in (1, 2)

    rerun = subprocess.run(_cmd(tiny_voc, killed, 2), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming step from" in rerun.stdout
    assert not partial.exists()  # removed once the step is complete
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    _assert_same_run(full, killed)


@pytest.mark.parametrize("method", ["EWC", "PLOP"])
def test_resume_at_step_1_is_exact(tiny_voc, tmp_path, monkeypatch, method):
    """Step 1 with EWC (regulariser statistics) or PLOP (pseudo-label thresholds recomputed on resume, POD): a crash
    after the epoch-0 checkpoint, then the same command, equals one uninterrupted run."""
    import run
    import train

    from experiment.builders import build_model
    from experiment.config import parse_config
    from methods.stack import build_method

    # an untrained step-0 model with EWC statistics stands in for a trained step 0 (the penalty is active)
    torch.manual_seed(0)
    cfg0 = parse_config(smoke_args(tiny_voc, tmp_path))
    model0 = build_model(cfg0, 0, method=build_method(cfg0), pretrained=False)
    gen = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in model0.named_parameters()}
    step0 = str(tmp_path / "step0.pth")
    torch.save({"epoch": 1, "model_state": model0.state_dict(), "best_score": 0.0,
                "trainer_state": {"regularizer": {"type": "ewc", "iteration": 5, "fisher": fisher}}}, step0)
    extra = ["--method", method, "--step_ckpt", step0, "--epochs", "2", "--val_interval", "10"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert run.main(_args(tiny_voc, full, steps=(1,), extra=[*extra, "--lr", "0.001"])) == 0

    args = _args(tiny_voc, crashed, steps=(1,), extra=[*extra, "--lr", "0.001"])
    original = interrupt_at_epoch(monkeypatch, 1)  # as Ctrl-C after the in-step checkpoint of epoch 0
    assert run.main(args) == 130
    assert (crashed / "ckpt" / CKPT.format(1).replace(".pth", ".partial.pth")).exists()
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert run.main(args) == 0
    a, b = _load(full, 1), _load(crashed, 1)
    if method == "EWC":
        assert a["trainer_state"]["regularizer"]["type"] == "ewc" and a["trainer_state"]["regularizer"]["iteration"] > 0
    _assert_same_state(a["model_state"], b["model_state"], "model_state")
    _assert_same_state(a["trainer_state"], b["trainer_state"], "trainer_state")
