"""Distributed failures: when one rank fails the whole command stops, non-zero, within a bounded time, with the
failing rank's one-line error in the output (no rank left hanging in a collective)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, smoke_args

pytestmark = pytest.mark.slow

LIMIT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_fails_the_others_stop(tmp_path):
    from dataset import build_datasets
    from dataset.synthetic import generate

    data = tmp_path / "data" / "PascalVOC12"
    generate(str(data), "voc", size=32, n_train=40, n_val=20, seed=0)
    out = tmp_path / "out"
    # evaluation shards: rank r reads validation indices r, r + 2, ...; break only the first image of rank 1
    _, val, _ = build_datasets(dataset="voc", root=str(data), task="15-5", step=0, overlap=False, crop_size=32,
                               cache_root=str(out / "cache"))
    assert len(val) >= 2
    victim = val.sample_path(1)[0]
    with open(victim, "r+b") as handle:
        handle.truncate(16)

    args = smoke_args(str(data), out, extra=["--lr", "0.01", "--batch_size", "4"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(ROOT, "run.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LIMIT_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        pytest.fail(f"the command hung for more than {LIMIT_S + 60} s:\n{output[-3000:]}")
    elapsed = time.time() - start
    assert proc.returncode != 0, output[-3000:]
    assert elapsed < LIMIT_S, f"took {elapsed:.0f} s"
    lines = [ln for ln in output.splitlines() if "error: rank 1: cannot decode image" in ln]
    assert lines and os.path.basename(victim) in lines[0], output[-3000:]
    # the surviving rank, if it gets to report before the launcher stops it, says so in one line (no traceback)
    assert "[rank0]: Traceback" not in output and "[rank0]:RuntimeError" not in output, output[-3000:]
    survivor = [ln for ln in output.splitlines() if "error: rank 0" in ln]
    assert all("another process of the job failed" in ln for ln in survivor), survivor
    assert not (out / "ckpt" / "15-5-voc_Experiment_0.pth").exists()
    assert not (out / "results").exists() or not os.listdir(out / "results")
