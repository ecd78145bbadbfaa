"""Smoke tests of benchmarks/ (tiny CPU configurations, in-process). Nothing here asserts on timings."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import common, data_loader, evaluation, host_sync, train_step


def test_flop_counter_matches_hand_count():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False)  # 10x10 -> 5x5
    grouped = nn.Conv2d(8, 4, kernel_size=1, groups=2)
    lin = nn.Linear(4 * 5 * 5, 7)
    model = nn.Sequential(conv, grouped, nn.Flatten(), lin)
    with common.FlopCounter(model) as fc:
        model(torch.zeros(2, 3, 10, 10))
    by_hand = 2 * (2 * 8 * 5 * 5 * 3 * 3 * 3)  # 2 x MACs: B * Cout * Hout * Wout * Cin * k * k
    by_hand += 2 * (2 * 4 * 5 * 5 * (8 // 2) * 1 * 1)
    by_hand += 2 * (2 * 7 * 100)
    assert fc.total == by_hand
    assert fc.per_module == {"0": 2 * 2 * 8 * 25 * 27, "1": 2 * 2 * 4 * 25 * 4, "3": 2 * 2 * 7 * 100}
    assert not conv._forward_hooks  # hooks removed
    assert common.training_step_flops(10, 4) == 34


def test_parse_variant():
    assert train_step.parse_variant("bf16+cl+compile") == {"amp": "bf16", "channels_last": True, "compile": True}
    assert train_step.parse_variant("cl") == {"amp": "off", "channels_last": True, "compile": False}
    with pytest.raises(SystemExit):
        train_step.parse_variant("bf16+fp16")
    with pytest.raises(SystemExit):
        train_step.parse_variant("tf32")


def test_train_step_benchmark_runs(capsys):
    out = train_step.main(["--device", "cpu", "--norm_act", "abn", "--size", "32", "--batch", "2", "--iters", "1",
                           "--repeats", "1", "--variants", "fp32,bf16,cl", "--peak_n", "128"])
    assert list(out["variants"]) == ["fp32", "bf16", "cl"]
    assert out["step_flops"] == 2 * (3 * out["forward_flops_new"] + out["forward_flops_old"])
    assert out["variants"]["fp32"]["speedup_vs_fp32"] == 1.0
    assert out["variants"]["bf16"]["warmup_loss"] == pytest.approx(out["variants"]["fp32"]["warmup_loss"], rel=5e-2)
    text = capsys.readouterr().out
    assert "| variant | speed vs fp32 |" in text and "ms/step" not in text  # CPU: ratios only


def test_data_loader_benchmark_runs(capsys):
    out = data_loader.main(["--workers", "0,2", "--crop_size", "32", "--batch", "4", "--batches", "3"])
    assert set(out["workers"]) == {0, 2} and out["pin_memory"] is False
    assert out["workers"][0]["timed_batches"] == 3 and out["workers"][2]["timed_batches"] == 4  # whole waves of 2
    assert out["workers"][2]["per_worker"] == pytest.approx(out["workers"][2]["images_per_s"] / 2)
    assert "images/s per worker" in capsys.readouterr().out


def test_evaluation_benchmark_runs(capsys):
    out = evaluation.main(["--device", "cpu", "--norm_act", "abn", "--size", "32", "--batch", "2", "--batches", "2",
                           "--repeats", "1", "--forward_variants", "fp32,cl"])
    assert out["metric"]["equal"] and out["metric"]["equal_masked"]
    assert out["forward"]["cl"]["pixel_agreement"] == 1.0
    assert "equal to the reference" in capsys.readouterr().out


def test_host_sync_audit_cli(capsys):
    assert host_sync.main(["--args", "--method MiB", "--iters", "2", "--log_interval", "2"]) == 0
    # 2 terms x (loss check, log line, epoch mean) + 1 weight check
    assert "| --method MiB | 1 | 7 | none |" in capsys.readouterr().out


def test_gpu_suite_reports_unknown_parts_and_keeps_going(tmp_path):
    import os
    import subprocess
    import sys

    from benchmarks.common import ROOT

    res = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "out"), "bogus", "tests"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 1 and "unknown part 'bogus'" in res.stderr
    assert "failed: bogus" in res.stdout  # the tests part still ran after the unknown one
    assert "[exit 0]" in (tmp_path / "out" / "tests.txt").read_text()


def test_methods_benchmark_runs(capsys):
    from benchmarks import methods

    out = methods.main(["--device", "cpu", "--norm_act", "abn", "--size", "32", "--batch", "2", "--iters", "1",
                        "--repeats", "1", "--methods", "PLOP,RCIL,DKD,STAR"])
    plop, rcil = out["methods"]["PLOP"], out["methods"]["RCIL"]
    # DKD's layout only turns the background channel into its auxiliary classifier: the same network as PLOP's;
    # STAR runs on a random prototype record of step 0
    assert out["methods"]["DKD"]["forward_flops"] == plop["forward_flops"] == out["methods"]["STAR"]["forward_flops"]
    assert all(math.isfinite(out["methods"][m]["warmup_loss"]) for m in ("DKD", "STAR"))
    assert plop["time_vs_first"] == 1.0 and rcil["time_vs_first"] > 0
    # the twins: every 3x3 residual conv and the ASPP convs doubled, so more weights, FLOPs and saved activations
    assert rcil["parameters"] > plop["parameters"] and rcil["forward_flops"] > plop["forward_flops"]
    assert rcil["activation_bytes"] > plop["activation_bytes"]
    assert "| method | time per step vs PLOP |" in capsys.readouterr().out


def test_backbones_benchmark_runs(capsys):
    pytest.importorskip("transformers")
    from benchmarks import backbones

    assert backbones.main(["--device", "cpu", "--backbones", "mit_b0", "--size", "32", "--batch", "2",
                           "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "| backbone | head | parameters | step time / resnet101 |" in text
    assert "| resnet101 | deeplabv3 |" in text and "| 1.00 |" in text and "| mit_b0 | segformer |" in text
    assert "peak memory" not in text  # CPU: ratios only


def test_threads_benchmark_runs_and_restores_the_process(capsys):
    import os

    import torch

    from benchmarks import threads

    affinity, count = os.sched_getaffinity(0), torch.get_num_threads()
    assert threads.main(["--load", "1", "--rounds", "1", "--iters", "1", "--size", "32", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| budget (1 thread) |" in out and "ratio torch default" in out
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == count


def test_cpu_budget_reads_cgroup_quotas(tmp_path, monkeypatch):
    from utils import threads

    monkeypatch.setattr(threads, "_own_cgroup", lambda version: "job" if version == "v2" else "")
    (tmp_path / "job").mkdir()
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "cpu.max").write_text("150000 100000\n")
    assert threads.quota_cpus(str(tmp_path)) == 1.5
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    assert threads.cpu_budget(str(tmp_path))[0] == 1
    (tmp_path / "job" / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cpus(str(tmp_path)) is None and threads.cpu_budget(str(tmp_path))[0] == 8
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.quota_cpus(str(tmp_path)) == 3.0
    assert threads.threads_for(8, 2, 1) == 3 and threads.threads_for(2, 1, 2) == 1


def test_run_sets_the_threads_it_logs_and_gives_them_back(monkeypatch):
    import torch

    from experiment.builders import cpu_threads
    from experiment.config import parse_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with cpu_threads(parse_config(["--threads", "3"])) as note:
        assert torch.get_num_threads() == 3 and "(--threads)" in note
    assert torch.get_num_threads() == before
    monkeypatch.setattr("experiment.builders.cpu_budget", lambda: (4, "4 CPUs this process may run on"))
    with cpu_threads(parse_config(["--num_workers", "1"])) as note:
        assert torch.get_num_threads() == 3 and "1 data-loader worker each" in note
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with cpu_threads(parse_config([])) as note:
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" in note
