"""torchrun beyond one process group on one machine: two "nodes" (two torchrun agents on this machine, gloo) against
the single-process run with the same effective batch, and an elastic restart after a worker is killed mid-epoch
(``--max_restarts 1``) against the uninterrupted run."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, smoke_args

pytestmark = pytest.mark.slow

TASK = "15-5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data, out, batch: int) -> list[str]:
    args = smoke_args(data, out, task=TASK, steps=(0, 1), extra=[
        "--lr", "0.01", "0.001", "--method", "MiB", "--att", "25", "--mask_att", "--epochs", "2", "--overlap"])
    args[args.index("--batch_size") + 1] = str(batch)
    args[args.index("--norm_act") + 1] = "iabn_sync"  # batch statistics over all processes, as one process has them
    return args


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*launcher) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, os.path.join(ROOT, "run.py")]


def _final(out, step: int) -> dict:
    return torch.load(out / "ckpt" / f"{TASK}-voc_Experiment_{step}.pth", weights_only=True)["model_state"]


def _rows(out) -> list[str]:
    return (out / "results" / f"test_voc_{TASK}_Experiment.csv").read_text().splitlines()


def _two_nodes(data, out) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents, node ranks 0 and 1, meeting at node 0's rendezvous endpoint (output to files: a full
    pipe would stall a worker)."""
    port = _free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(open(out / f"node{rank}.log", "w+"))
        procs.append(subprocess.Popen(_torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                                "--rdzv_endpoint", f"127.0.0.1:{port}") + _args(data, out, 4),
                                      cwd=out, env=_env(), stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    results = []
    for proc, log in zip(procs, logs):
        proc.wait(timeout=600)
        log.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, log.read(), ""))
    return results


@pytest.fixture(scope="module")
def runs(synthetic_voc, tmp_path_factory):
    """The single-process run (batch 8) and the two-node run (2 x batch 4) of the same two steps."""
    root = tmp_path_factory.mktemp("torchrun")
    single, nodes = root / "single", root / "nodes"
    single.mkdir(), nodes.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *_args(synthetic_voc, single, 8)],
                          cwd=single, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _two_nodes(synthetic_voc, nodes)
    for res in results:
        assert res.returncode == 0, res.stdout[-3000:]
    return single, nodes, results


def test_two_nodes_equal_the_single_process_run(runs):
    """Same images per update, batch statistics synchronised; what differs is that each process averages its loss
    over its own labelled pixels and DDP averages the processes' gradients (as the reference's DDP did), which is
    not the mean over all labelled pixels of the batch. Over the 2 x 2 epochs from scratch that moves the weights
    by about 2 % (relative L2; measured 1.9 % and 2.2 %), and the test scores not at all here. The two-node run
    itself is exact: the elastic test below finds it bit-identical to one node with two processes."""
    single, nodes, results = runs
    for step in (0, 1):
        a, b = _final(single, step), _final(nodes, step)
        assert a.keys() == b.keys()
        keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
        va, vb = (torch.cat([m[k].flatten().float() for k in keys]) for m in (a, b))
        assert float((va - vb).norm() / va.norm()) < 0.05, f"step {step}"
    rows_single, rows_nodes = _rows(single), _rows(nodes)
    assert [r.split(",")[0] for r in rows_nodes] == ["0", "1"]
    for x, y in zip(rows_single, rows_nodes):
        cells = [(float(p), float(q)) for p, q in zip(x.split(",")[1:], y.split(",")[1:]) if p not in "xX"]
        assert all(abs(p - q) < 2e-3 for p, q in cells), (x, y)


def test_two_nodes_write_every_file_once(runs):
    _, nodes, results = runs
    node0, node1 = results
    assert "wrote channel mask" in node0.stdout and "wrote channel mask" not in node1.stdout
    assert len(list((nodes / "channels").rglob("step1_union_att25_*[0-9a-f].pt"))) == 1
    assert sorted(p.name for p in (nodes / "ckpt").iterdir()) == [f"{TASK}-voc_Experiment_0.pth",
                                                                  f"{TASK}-voc_Experiment_1.pth"]
    log = (nodes / "logs" / f"{TASK}-voc" / "Experiment" / "run.log").read_text()
    assert log.count("== step 1 ") == 1  # one writer of the run log
    assert "effective batch 8 (batch_size 4 x 2 processes" in log
    command = (nodes / "logs" / f"{TASK}-voc" / "Experiment" / "command.txt").read_text().splitlines()
    assert len(command) == 2  # one call recorded once, not once per node


def _worker_of_rank(agent: int, rank: str) -> int | None:
    """The pid of the worker of global ``rank`` among the children of the torchrun agent ``agent``."""
    try:
        with open(f"/proc/{agent}/task/{agent}/children") as handle:
            children = [int(p) for p in handle.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"RANK") == rank.encode():
            return pid
    return None


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(runs, synthetic_voc, tmp_path):
    """torchrun --max_restarts 1 restarts the group after rank 0, the writer, is killed (SIGKILL: no clean-up) in
    the second epoch of step 1; the restarted group takes over the experiment lock its file still names, resumes from the in-step checkpoint and ends with the weights
    and results of the uninterrupted two-process run."""
    _, nodes, _ = runs
    out = tmp_path / "elastic"
    out.mkdir()
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", "--max_restarts", "1") + _args(synthetic_voc, out, 4)
    log = open(out / "torchrun.log", "w+")  # a file, not a pipe: nothing blocks while the test polls
    agent = subprocess.Popen(cmd, cwd=out, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    partial = out / "ckpt" / f"{TASK}-voc_Experiment_1.partial.pth"
    deadline, victim = time.time() + 300, None
    while agent.poll() is None and time.time() < deadline and victim is None:
        if partial.exists():
            victim = _worker_of_rank(agent.pid, "0")
        time.sleep(0.02)
    assert victim is not None, "no in-step checkpoint of step 1 appeared, or no worker of rank 0"
    os.kill(victim, signal.SIGKILL)
    agent.wait(timeout=600)
    log.seek(0)
    output = log.read()
    assert agent.returncode == 0, output[-4000:]
    assert "took over the lock" in output  # the killed group's lock file, its holder gone
    assert "resuming step from" in output and output.count("== step 0 ") == 1  # step 0 is not run again
    for step in (0, 1):
        a, b = _final(nodes, step), _final(out, step)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], f"step {step}"
    assert _rows(out) == _rows(nodes)
    assert not partial.exists()
