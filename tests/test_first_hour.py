"""A researcher's first hour: progress with k/n and an ETA in a plain (non-terminal) log and in the run's log file,
one run folder with the configuration and the command, a readable --help, percent units, notes given once, a step
that learns nothing says so, small final checkpoints and a report that counts a re-tested checkpoint once."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, smoke_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("first_hour") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=60, n_val=24, seed=0)
    return str(root)


def _run_cli(args, cwd, **env):
    """run.py in a subprocess with stdout a pipe (not a terminal): what a batch job's log file receives."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_progress_k_of_n_and_eta_reach_a_plain_log_and_the_run_log(voc, tmp_path):
    out = tmp_path / "out"
    args = smoke_args(voc, out, steps=(0, 1), extra=[
        "--epochs", "2", "--lr", "0.01", "--method", "PLOP", "--att", "25", "--mask_att", "--print_interval", "2",
        "--val_interval", "1"])
    args = [a for a in args if a != "--no_progress"]  # bars asked for; none drawn without a terminal
    stdout = _run_cli(args, tmp_path)
    run_log = (out / "logs" / "15-5-voc" / "Experiment" / "run.log").read_text()
    for text in (stdout, run_log):
        assert "== step 0 (1/2 of this call)" in text and "== step 1 (2/2 of this call)" in text
        assert re.search(r"step 0 epoch 1/2 iter 2/\d+ lr [\d.]+ loss_ce=[\d.]+ \([\d.]+s elapsed, epoch ETA [\d.]+s\)",
                         text)
        assert re.search(r"step 0 epoch 2/2 done in [\d.]+s \(step ETA", text)
        assert re.search(r"step 1 validation \(batches\): (\d+)/\1 done in", text)
        assert re.search(r"step 1 test \(batches\): (\d+)/\1 done in", text)
        assert re.search(r"AWT attribution \(images\): (\d+)/\1 done in", text)
        assert re.search(r"pseudo-label thresholds: old model over the training set \(batches\): (\d+)/\1 done", text)
        assert re.search(r"steps of this call: 1/2 \(50 %\), [\d.]+s elapsed, ETA", text)
        assert "steps of this call: 2/2 done in" in text
    assert "\r" not in stdout  # no bar redraws in a log file
    # percent everywhere a person reads mIoU, and the masked-validation note once for the call
    assert re.search(r"step 0 epoch 2/2 validation mIoU \d+\.\d\d %", stdout)
    assert re.search(r"step 1 test: mIoU \d+\.\d\d %, old / new / all / hIoU \d+\.\d\d / \d+\.\d\d / \d+\.\d\d / "
                     r"\d+\.\d\d %", stdout)
    assert stdout.count("note: validation at step > 0 scores the step's own labels") == 1
    assert run_log.startswith("20")  # full dates in the file


def test_the_run_folder_holds_config_and_command_and_outputs(voc, tmp_path):
    out = tmp_path / "run1"
    args = ["--dataset", "voc", "--data_root", voc, "--task", "15-5", "--step", "0", "--backbone", "resnet18",
            "--no_pretrained", "--norm_act", "abn", "--crop_size", "32", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "0", "--no_progress", "--method", "MiB", "--output_dir", str(out), "--date", "d"]
    cache = tmp_path / "user_cache"
    _run_cli(args, tmp_path, CISS_CACHE_DIR=str(cache))
    assert sorted(os.listdir(out)) == ["checkpoints", "logs", "results"]  # nothing scattered elsewhere
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results").exists()
    folder = out / "logs" / "15-5-voc" / "MiB"  # --name defaults to the method
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == "MiB" and config["checkpoint"] == str(out / "checkpoints")
    command = (folder / "command.txt").read_text().splitlines()
    assert command[0].startswith("# 20") and "--output_dir" in command[1] and "run.py" in command[1]
    assert (out / "checkpoints" / "15-5-voc_MiB_0.pth").is_file()
    assert (out / "results" / "d_voc_15-5_MiB.csv").is_file()
    caches = list(cache.rglob("*.npy"))  # index caches in the user cache folder, one sub-folder per data root
    assert caches and all(str(p).startswith(str(cache / "PascalVOC12-")) for p in caches)
    _run_cli(args, tmp_path, CISS_CACHE_DIR=str(cache))  # a second call appends its command line
    assert len((folder / "command.txt").read_text().splitlines()) == 4


def test_default_names_say_the_method():
    from experiment.config import parse_config

    assert parse_config(["--method", "MiB"]).name == "MiB"
    assert parse_config(["--method", "MiB", "--att", "25", "--mask_att"]).name == "MiB+AWT"
    assert parse_config(["--method", "PLOP"]).name == "PLOP"
    assert parse_config([]).name == "FT"
    assert parse_config(["--method", "MiB", "--name", "mine"]).name == "mine"


def test_help_is_grouped_with_defaults_and_the_reference_leftovers_last():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    text = proc.stdout
    assert proc.returncode == 0
    assert len(text.splitlines()[0]) < 120  # a one-line usage, not 80 lines of flags
    assert "--epochs EPOCHS                 epochs per step (default: 30)" in text
    assert re.search(r"--lr LR \[LR \.\.\.\]\s+learning rate, one per --step or one for all \(default: \[0\.007\]\)", text)
    for flag in ("--crop_val", "--visualize", "--strict_weights"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(flag))
        assert "[inverted reference flag]" in line
    ignored = text.index("reference flags accepted and ignored")
    rejected = text.index("reference flags not implemented here")
    assert ignored < rejected
    assert all(text.index(flag) > ignored for flag in ("--dont_predict_bg", "--fusion-mode", "--copy_share"))
    assert all(text.index(flag) > rejected for flag in ("--nca ", "--cosine", "--align_weight ", "--no_mask"))
    assert text.index("--epochs") < ignored
    for script, words in (("attribute.py", "Integrated Gradients"), ("attribute_class.py", "one mask per new class"),
                          ("evaluate.py", "Evaluate a step checkpoint")):
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=120).stdout
        assert words in out, script
        assert "(default: 30)" in out


def test_a_step_that_learns_nothing_says_so(voc, tmp_path, caplog):
    import run

    out = tmp_path / "out"
    assert run.main(smoke_args(voc, out, extra=["--lr", "0.01"])) == 0
    caplog.set_level("WARNING")
    # threshold 1.5: no old-model probability passes, so no background pixel gets a pseudo-label
    args = smoke_args(voc, out, steps=(1,), extra=["--lr", "0.001", "--pseudo", "threshold_1.5", "--epochs", "2"])
    assert run.main(args) == 0
    notes = [r.getMessage() for r in caplog.records if "no pseudo-label was accepted" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("step 1 epoch 1/2: ")  # once per step, not per epoch
    caplog.clear()
    run.warn_about_epoch(3, 0, 5, {"loss_ce": 0.0, "loss_kd": 0.0}, [])
    run.warn_about_epoch(3, 1, 5, {"loss_ce": 0.0, "loss_kd": 0.0}, [])
    zero = [r.getMessage() for r in caplog.records]
    assert len(zero) == 1 and "every loss term is 0 (loss_ce, loss_kd)" in zero[0]


def test_norm_fallback_is_logged(voc, tmp_path, caplog):
    import run
    from modules.norm import HAS_INPLACE_ABN

    if HAS_INPLACE_ABN:
        pytest.skip("inplace_abn is installed: nothing falls back")
    caplog.set_level("INFO")
    assert run.main(smoke_args(voc, tmp_path, extra=["--lr", "0.01", "--norm_act", "iabn_sync"])) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--norm_act iabn_sync:")]
    assert len(lines) == 1 and "ABNSync(abs_weight=True) is used" in lines[0]


def test_a_retested_checkpoint_counts_once_in_the_report(voc, tmp_path, capsys):
    import report
    import run

    out = tmp_path / "out"
    assert run.main(smoke_args(voc, out, steps=(0, 1), extra=["--lr", "0.01", "--method", "MiB"])) == 0
    for date in ("again", "third"):  # re-tests of the same checkpoints into CSVs of other dates
        assert run.main(smoke_args(voc, out, steps=(0, 1), extra=["--method", "MiB", "--test", "--date", date])) == 0
    records = [json.loads(p.read_text()) for p in (out / "results").glob("*.run.json")]
    assert len({r["steps"]["1"]["train_id"] for r in records}) == 1
    capsys.readouterr()
    assert report.main([str(out / "results"), "--per-step"]) == 0
    text = capsys.readouterr().out
    assert "| voc (synthetic) | 15-5 | Experiment | 1 | 2/2 |" in text  # n = 1, not 3
    assert "Counted once (tested from the same checkpoint as another CSV)" in text
    # a second training is a second result
    other = tmp_path / "other"
    shutil.copytree(out / "ckpt", other / "ckpt")
    assert run.main(smoke_args(voc, other, steps=(1,), extra=["--lr", "0.02", "--method", "MiB", "--overwrite",
                                                              "--date", "retrained"])) == 0
    shutil.copy(other / "results" / "retrained_voc_15-5_Experiment.csv", out / "results")
    shutil.copy(other / "results" / "retrained_voc_15-5_Experiment.run.json", out / "results")
    assert report.main([str(out / "results")]) == 0
    assert "| voc (synthetic) | 15-5 | Experiment | 2 | 2/2 |" in capsys.readouterr().out


def test_plot_has_integer_steps_full_scale_and_names_synthetic_data(voc, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metrics import report

    out = tmp_path / "out"
    import run

    assert run.main(smoke_args(voc, out, steps=(0, 1), extra=["--lr", "0.01"])) == 0
    runs = report.load_runs([str(out / "results")])
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *a, **k):
        captured["fig"] = fig
        return original(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        report.plot_curves(report.group_runs(runs), str(tmp_path / "p.png"), full_scale=True)
    finally:
        plt.Figure.savefig = original
    axes = captured["fig"].axes
    assert all(ax.get_ylim() == (0.0, 100.0) for ax in axes)
    ticks = axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    assert "synthetic data" in axes[0].get_title()


def test_final_checkpoints_of_the_reference_layout_still_load(voc, tmp_path):
    """A final checkpoint written with optimiser state (the reference's and our earlier layout) still serves as
    the previous step and for --test."""
    import run

    out = tmp_path / "out"
    assert run.main(smoke_args(voc, out, extra=["--lr", "0.01"])) == 0
    path = out / "ckpt" / "15-5-voc_Experiment_0.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(optimizer_state={"state": {}, "param_groups": []}, scheduler_state={"last_epoch": 3})
    for key in ("run_record", "train_id"):
        ckpt.pop(key)
    torch.save(ckpt, path)
    assert run.main(smoke_args(voc, out, steps=(1,), extra=["--lr", "0.001"])) == 0
    assert run.main(smoke_args(voc, out, extra=["--test", "--date", "again"])) == 0
