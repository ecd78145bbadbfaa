"""Nothing lost, nothing made up: non-finite weights, reruns with changed flags, full disks, concurrent runs,
incompatible checkpoints, flag validation, hand-edited results files and truthful messages.

Each test asserts the exit status, the single ``error:`` line and that no file the user had changed (hashes before
and after), as tests/test_errors.py does.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, interrupt_at_epoch, smoke_args
from test_errors import _assert_one_line, _run, _tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("robust_data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=40, n_val=20, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def step0(tiny_voc, tmp_path_factory):
    """A trained (one epoch) step 0 of VOC 15-5, ResNet-18, copied by the tests that need one."""
    import run

    out = tmp_path_factory.mktemp("robust_step0")
    assert run.main(smoke_args(tiny_voc, out, extra=["--lr", "0.01"])) == 0
    return out


def _ckpt(out, step=0, suffix=""):
    return os.path.join(str(out), "ckpt", f"15-5-voc_Experiment_{step}{suffix}.pth")


def _nan_model_checkpoint(step0, tmp_path, name="nan.pth"):
    """The step-0 checkpoint with a NaN bias, carrying in-step keys too so that it is also a resume candidate."""
    ckpt = torch.load(_ckpt(step0), weights_only=True)
    ckpt["model_state"]["cls.0.bias"][3] = float("nan")
    ckpt.update(optimizer_state={"state": {}, "param_groups": []}, scheduler_state={})
    path = str(tmp_path / name)
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------------ 1. non-finite weights
class _PoisonedSGD(torch.optim.SGD):
    """SGD whose update of the last iteration of epoch 0 puts NaN into a weight (a finite loss, a diverging step)."""

    calls = 0
    poison_at = 1  # the 15-5 step-0 training subset of the 40 images fills one batch of 12 (drop_last)

    def step(self, closure=None):
        out = super().step(closure)
        type(self).calls += 1
        if type(self).calls == self.poison_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out


@pytest.mark.parametrize("epochs", [1, 2])
def test_nonfinite_weights_are_never_written(tiny_voc, tmp_path, capsys, monkeypatch, epochs):
    import run

    _PoisonedSGD.calls = 0
    monkeypatch.setattr(run, "build_optimizer", lambda groups, cfg, lr: _PoisonedSGD(groups, lr=lr, momentum=0.9))
    args = smoke_args(tiny_voc, tmp_path, extra=["--lr", "0.01", "--epochs", str(epochs), "--batch_size", "12"])
    rc, err = _run(args, capsys)
    _assert_one_line(rc, err, f"non-finite weights at step 0 epoch 1/{epochs}, by iteration 1/1", "NaN or inf",
                     "lower --lr", "--no_auto_resume")
    assert not os.path.exists(_ckpt(tmp_path)) and not os.path.exists(_ckpt(tmp_path, suffix=".partial"))
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")
    monkeypatch.undo()
    assert run.main(args[:args.index("--lr")] + ["--lr", "0.005"] + args[args.index("--lr") + 2:]) == 0


@pytest.mark.parametrize("how", ["--test", "--step_ckpt", "evaluate", "--ckpt"])
def test_nonfinite_checkpoints_are_refused(step0, tiny_voc, tmp_path, capsys, how):
    import evaluate

    bad = _nan_model_checkpoint(step0, tmp_path)
    out = tmp_path / "out"
    shutil.copytree(step0 / "ckpt", out / "ckpt")
    before = _tree(str(tmp_path))
    if how == "--test":
        rc, err = _run(smoke_args(tiny_voc, out, extra=["--test", "--ckpt", bad]), capsys)
        fragments = ("holds NaN or inf (cls.0.bias)", "retrain the step")
    elif how == "--step_ckpt":
        rc, err = _run(smoke_args(tiny_voc, out, steps=(1,), extra=["--step_ckpt", bad, "--lr", "0.001"]), capsys)
        fragments = ("previous-step checkpoint", "holds NaN or inf", "retrain step 0")
    elif how == "--ckpt":
        rc, err = _run(smoke_args(tiny_voc, out, extra=["--ckpt", bad, "--overwrite"]), capsys)
        fragments = ("resume checkpoint", "holds NaN or inf", "give another --ckpt")
    else:
        rc = evaluate.main(smoke_args(tiny_voc, out, extra=["--ckpt", bad, "--out_dir", str(out / "eval")]))
        err = capsys.readouterr().err
        fragments = ("holds NaN or inf", "no result is computed")
    line = _assert_one_line(rc, err, *fragments)
    assert "--lr" not in line  # a broken file is not blamed on the learning rate
    assert _tree(str(tmp_path)) == before


def test_metrics_json_is_strict_json(step0, tiny_voc, tmp_path):
    import evaluate

    out = tmp_path / "eval"
    args = smoke_args(tiny_voc, step0, extra=["--out_dir", str(out), "--save_samples", "0"])
    assert evaluate.main(args) == 0
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert metrics["new"] is None  # no class was added at step 0: null, not NaN


# ------------------------------------------------------------------------------------------------ 2. changed flags
def test_a_changed_lr_is_applied_on_resume(tiny_voc, tmp_path, monkeypatch, caplog):
    import run
    import train

    args = smoke_args(tiny_voc, tmp_path, extra=["--lr", "0.01", "--epochs", "2", "--batch_size", "12"])
    original = interrupt_at_epoch(monkeypatch, 1)
    assert run.main(args) == 130
    partial = torch.load(_ckpt(tmp_path, suffix=".partial"), weights_only=True)
    assert partial["step_lr"] == 0.01
    monkeypatch.setattr(train, "train_one_epoch", original)
    new = args[:args.index("--lr")] + ["--lr", "0.004"] + args[args.index("--lr") + 2:]
    caplog.set_level("INFO")
    assert run.main(new) == 0
    assert any("--lr 0.004 differs from the 0.01" in r.getMessage() for r in caplog.records)
    # the optimiser trains epoch 2 at the new poly schedule: 0.004 * (1 - 1/2) ** 0.9
    assert any("epoch 2/2 iter 1/1 lr 0.002144" in r.getMessage() for r in caplog.records)
    final = torch.load(_ckpt(tmp_path), weights_only=True)
    assert final["step_lr"] == 0.004 and json.loads(final["config"])["lr"] == [0.004]
    assert final["run_record"]["lr"] == 0.004
    record = json.loads(open(os.path.join(tmp_path, "results", "test_voc_15-5_Experiment.run.json")).read())
    assert record["steps"]["0"]["lr"] == 0.004


def test_another_changed_flag_is_refused_naming_it(tiny_voc, tmp_path, monkeypatch, capsys):
    import run
    import train

    args = smoke_args(tiny_voc, tmp_path, extra=["--lr", "0.01", "--epochs", "2", "--batch_size", "12"])
    original = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, epoch, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if epoch == 1 else original(*a, epoch=epoch, **k))
    assert run.main(args) == 130
    monkeypatch.setattr(train, "train_one_epoch", original)
    capsys.readouterr()
    before = _tree(str(tmp_path))
    changed = args + ["--weight_decay", "0.001"]
    rc, err = _run(changed, capsys)
    _assert_one_line(rc, err, "--weight_decay 0.0001 there, 0.001 now", "--no_auto_resume")
    assert _tree(str(tmp_path)) == before


# ------------------------------------------------------------------------------------------------ 4. reruns
def test_rerun_continues_and_tests_an_untested_step(step0, tiny_voc, tmp_path, capsys):
    import run

    out = tmp_path / "out"
    shutil.copytree(step0, out)
    step0_bytes = open(_ckpt(out), "rb").read()
    csv = out / "results" / "test_voc_15-5_Experiment.csv"
    csv.unlink()  # killed between the checkpoint and the test: the rerun tests it and writes its row
    assert run.main(smoke_args(tiny_voc, out, steps=(0, 1), extra=["--lr", "0.01", "0.001"])) == 0
    assert [r.split(",")[0] for r in csv.read_text().splitlines()] == ["0", "1"]
    assert open(_ckpt(out), "rb").read() == step0_bytes  # step 0 was not retrained
    rc, err = _run(smoke_args(tiny_voc, out, steps=(0, 0)), capsys)
    _assert_one_line(rc, err, "--step 0 0", "each step once")


# ------------------------------------------------------------------------------------------------ 5. full disks
def _limited(limit_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def _run_limited(args, limit, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=_limited(limit))


def test_full_disk_before_training(tiny_voc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file the user had")
    before = _tree(str(out))
    proc = _run_limited(smoke_args(tiny_voc, out), 1000, tmp_path)
    line = _assert_one_line(proc.returncode, proc.stderr, "no space left to write in", "free")
    assert _tree(str(out)) == before and line


def test_full_disk_when_the_checkpoint_is_written(step0, tiny_voc, tmp_path):
    """Training works (index caches, TensorBoard off) but the 45 MB checkpoint does not fit under the limit."""
    out = tmp_path / "out"
    shutil.copytree(step0, out)
    before = _tree(str(out / "ckpt"), str(out / "results"))
    args = smoke_args(tiny_voc, out, steps=(1,), extra=["--lr", "0.001", "--name", "Experiment"])
    proc = _run_limited(args, 2_000_000, tmp_path)
    line = _assert_one_line(proc.returncode, proc.stderr, "cannot write", "15-5-voc_Experiment_1.pth",
                            str(out / "ckpt"), "free", "the previous file is kept")
    assert _tree(str(out / "ckpt"), str(out / "results")) == before and line
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert not leftovers


# ------------------------------------------------------------------------------------------------ 6. concurrent runs
def test_two_runs_on_one_name_cannot_clobber_each_other(tiny_voc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = smoke_args(tiny_voc, tmp_path, extra=["--lr", "0.01", "--epochs", "50", "--batch_size", "12"])
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "ckpt" / ".15-5-voc_Experiment.lock"
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        assert lock.exists(), "the first run never took its lock"
        second = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        line = _assert_one_line(second.returncode, second.stderr, "another run is using --name Experiment",
                                f"PID {first.pid}", "host")
        assert line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock is free again: a third run takes it over
    third = args[:args.index("--epochs")] + ["--epochs", "1"] + args[args.index("--epochs") + 2:] + \
        ["--no_auto_resume"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *third], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not lock.exists()  # a run that ends removes its lock


# ------------------------------------------------------------------------------------------------ 7. incompatible files
def test_incompatible_checkpoints_are_named_before_loading(step0, tiny_voc, tmp_path, capsys):
    import attribute
    import evaluate

    ckpt = torch.load(_ckpt(step0), weights_only=True)
    other_stride = dict(ckpt, config=json.dumps({**json.loads(ckpt["config"]), "output_stride": 8}))
    torch.save(other_stride, tmp_path / "os8.pth")
    torch.save(ckpt["model_state"], tmp_path / "bare.pth")
    before = _tree(str(tmp_path))
    cases = [
        (["--step", "1", "--step_ckpt", str(tmp_path / "os8.pth"), "--lr", "0.001"],
         ("previous-step checkpoint", "--output_stride 8", "this run builds --output_stride 16")),
        (["--test", "--ckpt", _ckpt(step0), "--backbone", "resnet50"], ("--backbone resnet18", "resnet50")),
        (["--ckpt", str(tmp_path / "bare.pth"), "--overwrite"], ("no optimizer and schedule state", "--step_ckpt")),
    ]
    for extra, fragments in cases:
        rc, err = _run(smoke_args(tiny_voc, tmp_path / "out", extra=extra), capsys)  # a later --step wins
        _assert_one_line(rc, err, *fragments)
    rc = attribute.main(smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=[
        "--att", "25", "--mask_att", "--step_ckpt", _ckpt(step0), "--norm_act", "std"]))
    _assert_one_line(rc, capsys.readouterr().err, "--norm_act abn", "this run builds --norm_act std")
    rc = evaluate.main(smoke_args(tiny_voc, step0, extra=["--backbone", "resnet50"]))
    _assert_one_line(rc, capsys.readouterr().err, "was trained with --backbone resnet18")
    assert _tree(str(tmp_path)) == before


# ------------------------------------------------------------------------------------------------ 8. flag validation
@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "0"], "--lr: '0' must be > 0"), (["--lr", "nan"], "not finite"), (["--lr", "inf"], "not finite"),
    (["--momentum", "1"], "[0, 1)"), (["--val_interval", "0"], "--val_interval: '0' must be >= 1"),
    (["--ckpt_interval", "0"], "must be >= 1"), (["--print_interval", "0"], "must be >= 1"),
    (["--num_workers", "-1"], "must be >= 0"), (["--crop_size", "0"], "must be >= 1"),
    (["--name", "../x"], "not a plain name"), (["--name", "a/b"], "not a plain name"),
    (["--batch_size", "1"], "--batch_size 1 trains batch norm"), (["--loss_kd", "-1"], "must be >= 0"),
])
def test_bad_flag_values_are_refused_when_parsed(tiny_voc, tmp_path, capsys, flags, fragment):
    before = _tree(str(tmp_path))
    rc, err = _run(smoke_args(tiny_voc, tmp_path / "out") + flags, capsys)
    _assert_one_line(rc, err, fragment)
    assert _tree(str(tmp_path)) == before


def test_report_flags_and_non_utf8_split_files(tiny_voc, tmp_path, capsys):
    import report

    for argv, fragment in ((["--decimals", "12", str(tmp_path)], "at most 6 decimals"),
                           (["--plot", "curves.jpg", str(tmp_path)], ".png, .pdf or .svg")):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2 and fragment in capsys.readouterr().err
    data = tmp_path / "PascalVOC12"
    shutil.copytree(tiny_voc, data)
    (data / "splits" / "val.txt").write_bytes(b"\xff\xfe/JPEGImages/x.jpg \x80\n")
    rc, err = _run(smoke_args(str(data), tmp_path / "out"), capsys)
    _assert_one_line(rc, err, "val.txt", "is not UTF-8")


# ------------------------------------------------------------------------------------------------ 9. hand-edited CSVs
def test_a_hand_edited_results_file_is_updated_not_crashed_on(step0, tiny_voc, tmp_path, capsys):
    import report
    import run

    out = tmp_path / "out"
    shutil.copytree(step0, out)
    csv = out / "results" / "test_voc_15-5_Experiment.csv"
    row0 = csv.read_text().strip()
    csv.write_text("step," + ",".join(f"c{i}" for i in range(21)) + ",mIoU\n\n" + row0 + "\n\n")
    assert report.main([str(csv)]) == 0  # report.py accepts the header and the blank lines
    assert run.main(smoke_args(tiny_voc, out, steps=(1,), extra=["--lr", "0.001"])) == 0
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("step,c0") and [ln.split(",")[0] for ln in lines[1:]] == ["0", "1"]
    capsys.readouterr()
    assert report.main([str(csv)]) == 0 and "| voc (synthetic) | 15-5 |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ 10. true messages
def test_messages_say_what_is_true(step0, tiny_voc, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(random.Random(2).randbytes(4096))  # bytes that trip the unpickler (IndexError), not torch
    rc, err = _run(smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--step_ckpt", str(junk)]), capsys)
    line = _assert_one_line(rc, err, "is not a checkpoint")
    assert "allow-list" not in line
    a_file = tmp_path / "data.txt"
    a_file.write_text("x")
    rc, err = _run(smoke_args(str(a_file), tmp_path / "out"), capsys)
    _assert_one_line(rc, err, "is a file, not a folder")
    out = tmp_path / "trunc"
    shutil.copytree(step0, out)
    final = _ckpt(out)
    partial = _ckpt(out, suffix=".partial")
    with open(final, "rb") as src, open(partial, "wb") as dst:
        dst.write(src.read()[:5000])  # a truncated in-step checkpoint
    os.remove(final)
    os.remove(out / "results" / "test_voc_15-5_Experiment.csv")
    rc, err = _run(smoke_args(tiny_voc, out, extra=["--lr", "0.01"]), capsys)
    _assert_one_line(rc, err, "resume checkpoint", "truncated", "--no_auto_resume")
