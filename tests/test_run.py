"""End-to-end runs through run.py's command line on the synthetic dataset."""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, smoke_args

pytestmark = pytest.mark.slow


def _run(args):
    import run

    return run.main(args)


def _csv_rows(out, task="15-5", name="Experiment"):
    with open(os.path.join(out, "results", f"test_voc_{task}_{name}.csv")) as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("method", ["FT", "MiB"])
def test_two_steps_write_checkpoints_csv_and_summary(synthetic_voc, tmp_path, method):
    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=["--lr", "0.01", "0.001", "--method", method,
                                                                       "--name", method, "--overlap"])
    assert _run(args) == 0
    for step in (0, 1):
        assert os.path.isfile(tmp_path / "ckpt" / f"15-5-voc_{method}_{step}.pth")
    rows = _csv_rows(tmp_path, name=method)
    assert [r[0] for r in rows] == ["0", "1"]
    assert len(rows[0]) == 1 + 21 + 1
    assert rows[0][17:22] == ["x"] * 5  # classes 16-20 not learnt at step 0
    assert all(c not in ("x",) for c in rows[1][1:22])
    summary = (tmp_path / "results" / f"test_voc_15-5_{method}_summary.md").read_text()
    assert "| step | old | new | all | hIoU |" in summary and "| 1 |" in summary
    record = json.loads((tmp_path / "results" / f"test_voc_15-5_{method}.run.json").read_text())["steps"]["1"]
    assert record["norm_act"] == "abn" and record["norm_layers"] == "pure-PyTorch ABN"
    assert re.search(r"\| 0 \| \d+\.\d\d \| - \| \d+\.\d\d \| - \|", summary)  # no new class, no hIoU at step 0


def test_final_checkpoint_holds_what_the_next_step_needs_and_no_optimiser_state(synthetic_voc, tmp_path):
    """The step's checkpoint keeps the reference keys the next step and evaluation read; the optimiser, schedule
    and RNG state live in the in-step file only. Step 1 and evaluate.py start from it."""
    import torch
    import evaluate

    assert _run(smoke_args(synthetic_voc, tmp_path, extra=["--lr", "0.01", "--method", "EWC"])) == 0
    path = tmp_path / "ckpt" / "15-5-voc_Experiment_0.pth"
    ckpt = torch.load(path, weights_only=True)
    for key in ("epoch", "model_state", "best_score", "trainer_state", "config", "train_id", "run_record"):
        assert key in ckpt
    for key in ("optimizer_state", "scheduler_state", "scaler_state", "rng_state"):
        assert key not in ckpt
    assert "cls.0.weight" in ckpt["model_state"]
    fisher = ckpt["trainer_state"]["regularizer"]["fisher"]  # the regulariser's statistics travel to the next step
    tensors = sum(v.numel() * v.element_size() for d in (ckpt["model_state"], fisher) for v in d.values())
    assert path.stat().st_size < 1.1 * tensors  # weights and statistics, no momentum buffers
    assert _run(smoke_args(synthetic_voc, tmp_path, steps=(1,), extra=["--lr", "0.001", "--method", "EWC"])) == 0
    assert evaluate.main(smoke_args(synthetic_voc, tmp_path, extra=["--method", "EWC"])) == 0


def test_existing_step_is_not_overwritten(synthetic_voc, tmp_path, capsys):
    """Rerunning the same command continues the experiment: a trained and tested step is skipped, untouched."""
    args = smoke_args(synthetic_voc, tmp_path, extra=["--lr", "0.01"])
    assert _run(args) == 0
    path = tmp_path / "ckpt" / "15-5-voc_Experiment_0.pth"
    before = path.read_bytes()
    capsys.readouterr()
    assert _run(args) == 0
    assert "step 0 is already trained and tested" in capsys.readouterr().out
    assert path.read_bytes() == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("awt", [False, True], ids=["MiB", "MiB+AWT"])
def test_two_process_gloo_ddp(synthetic_voc, tmp_path, awt):
    extra = ["--lr", "0.01", "0.001", "--method", "MiB"] + (["--att", "25", "--mask_att"] if awt else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           os.path.join(ROOT, "run.py"), *smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv_rows(tmp_path)
    assert [r[0] for r in rows] == ["0", "1"]
    if awt:  # rank 0 computed the mask, the other rank loaded the same file
        assert len(list((tmp_path / "channels").rglob("step1_union_att25_*[0-9a-f].pt"))) == 1
        assert "wrote channel mask" in proc.stdout
