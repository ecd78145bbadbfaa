"""No host-device synchronisation inside the training loop except at the logging iterations, for every method.

The audit (benchmarks/host_sync.py) records the operations that make the host wait for a CUDA device while real
training iterations run on the CPU; a synchronisation in a loss term or in the engine fails here without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.host_sync import PLUGIN_RUNS, PRESET_RUNS, HostSyncRecorder, audit, outside_logging

EXTRA_RUNS = [
    ["--method", "PLOP", "--pseudo", "naive"],
    ["--method", "PLOP", "--pseudo", "threshold_0.5"],
    ["--method", "PLOP", "--pseudo", "confidence"],
    ["--method", "PLOP", "--pseudo", "median"],
    ["--method", "PLOP", "--pseudo_entropy_fixed", "--pseudo_exact_median", "--ce_on_pseudo"],
    ["--method", "PLOP", "--pseudo_soft", "soft_uncertain", "--classif_adaptive_min_factor", "0.1"],
    ["--method", "PLOP", "--pod", "spatial", "--pod_prepro", "pow", "--pod_interpolate_last"],
    ["--method", "MiB", "--bce"],
    ["--method", "MiB", "--focal_loss", "--kd_need_labels", "--alpha", "0.5"],
    ["--method", "LWF-MC", "--icarl_disjoint"],
]


def test_recorder_sees_synchronising_operations_only():
    x = torch.arange(6.0)
    with HostSyncRecorder() as rec:
        x.sum().item()
        x[x > 2]  # boolean index: nonzero inside the kernel
        torch.nonzero(x)
        torch.bincount(x.long())
    assert [s.op for s in rec.syncs] == ["aten._local_scalar_dense.default", "aten.index.Tensor",
                                         "aten.nonzero.default", "aten.bincount.default"]
    assert all(s.file == "tests/test_host_sync.py" and s.function == "test_recorder_sees_synchronising_operations_only"
               for s in rec.syncs)
    with HostSyncRecorder() as rec:
        torch.where(x > 2, x, 0.0).sum()
        x[torch.tensor([0, 2])]  # integer index: no synchronisation
        x.masked_fill(x > 2, 0.0)
    assert rec.syncs == []


@pytest.mark.parametrize("argv,step", PRESET_RUNS + PLUGIN_RUNS + [(a, 1) for a in EXTRA_RUNS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else f"step{v}")
def test_training_loop_synchronises_only_to_log(argv, step):
    syncs = audit(argv, step, iters=4, log_interval=2)
    assert outside_logging(syncs) == []
    assert syncs, "the logging iterations read the losses: the recorder saw nothing, so it was not active"


@pytest.mark.parametrize("method", ["MiB", "PLOP"])
def test_bf16_training_loop_synchronises_only_to_log(method):
    syncs = audit(["--method", method], 1, iters=3, log_interval=3, amp="bf16")
    assert outside_logging(syncs) == [] and syncs
