"""Shared fixtures: small synthetic datasets on disk and a way to call the command-line programs in-process."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test process (pytest-xdist runs one per core): torch and the programs the tests start
    # (torchrun, the scripts) read OMP_NUM_THREADS, and more threads than cores only wait on each other
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _logger_levels():
    """The benchmarks quieten some loggers for their own output (they are programs); tests that run them in-process
    must not leave later tests without those log lines."""
    import logging

    names = ("train", "methods", "run", "progress", "")
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Runs without --cache_root write their index caches here, not into the user's ~/.cache."""
    old = os.environ.get("CISS_CACHE_DIR")
    os.environ["CISS_CACHE_DIR"] = str(tmp_path_factory.mktemp("user_cache"))
    yield
    if old is None:
        os.environ.pop("CISS_CACHE_DIR", None)
    else:
        os.environ["CISS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """A tiny synthetic Pascal-VOC (32 px) in the real layout, shared by the end-to-end tests."""
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=120, n_val=48, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("data_ade") / "ADE"
    generate(str(root), "ade", size=32, seed=0)
    return str(root)


def interrupt_at_epoch(monkeypatch, epoch: int = 1):
    """Make ``train.train_one_epoch`` raise KeyboardInterrupt when it starts ``epoch`` (Ctrl-C after the in-step
    checkpoint of the epoch before); returns the original function, to put back before resuming."""
    import train

    original = train.train_one_epoch

    def interrupted(*args, epoch: int, **kwargs):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return original(*args, epoch=epoch, **kwargs)

    stop_at = epoch
    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    return original


def kill_and_resume(monkeypatch, args: list[str], epoch: int) -> None:
    """``run.py args`` interrupted as ``epoch`` starts (exit 130), then run again to the end (exit 0)."""
    import run
    import train

    original = interrupt_at_epoch(monkeypatch, epoch)
    assert run.main(args) == 130
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert run.main(args) == 0


def smoke_args(data_root: str, out, *, task: str = "15-5", steps=(0,), dataset: str = "voc", extra=()) -> list[str]:
    """A fast run.py command line (ResNet-18, 32 px crops, one epoch) writing everything under ``out``."""
    out = str(out)
    return ["--dataset", dataset, "--data_root", data_root, "--task", task, "--step", *map(str, steps),
            "--backbone", "resnet18", "--no_pretrained", "--norm_act", "abn", "--crop_size", "32",
            "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--no_progress", "--visualize",
            "--checkpoint", os.path.join(out, "ckpt"), "--results_dir", os.path.join(out, "results"),
            "--logdir", os.path.join(out, "logs"), "--cache_root", os.path.join(out, "cache"),
            "--channels_dir", os.path.join(out, "channels"), "--date", "test", "--name", "Experiment", *extra]
