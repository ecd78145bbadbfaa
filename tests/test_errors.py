"""One test per bad input: exit code 2, one line ``error: ...`` naming what/where/how, no traceback, and no file under
the output folders (or the data) changed or appeared.

Checks made before training run ``run.main`` in-process on a tiny synthetic VOC; a fabricated step-0 checkpoint (an
untrained model saved in the framework's layout) stands in for a trained one, so no test trains unless it has to.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smoke_args

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    """A pristine tiny synthetic VOC (read only: tests that corrupt data work on a copy)."""
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("errors_data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=40, n_val=20, seed=0)
    return str(root)


@pytest.fixture
def data_copy(tiny_voc, tmp_path):
    dst = tmp_path / "data" / "PascalVOC12"
    shutil.copytree(tiny_voc, dst)
    return str(dst)


RUN_FILES = ("run.log", "command.txt", "config.json", "calls.jsonl")  # a call's own record in its run folder, failed calls too


def _tree(*roots, skip=()) -> dict[str, str]:
    """sha1 of every file under ``roots`` (``skip``: folders left out). Not results, and so left out: the
    experiment lock a running step holds in its checkpoint folder, and the log, command line and configuration
    that every call that passed the checks records in its run folder (a failed call's log says why it failed)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
            for name in files:
                if name.startswith(".") and name.endswith(".lock") or name in RUN_FILES:
                    continue
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    out[path] = hashlib.sha1(handle.read()).hexdigest()
    return out


def _run(argv, capsys) -> tuple[int, str]:
    import run

    try:
        rc = run.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors (unknown --method, bad choices)
        rc = exc.code
    return rc, capsys.readouterr().err


def _assert_one_line(rc, err, *fragments) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err
    line = errors[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


def _check(argv, capsys, roots, *fragments, skip=()) -> str:
    """Run, assert the one-line error, and that nothing under ``roots`` changed (``skip``: derived caches)."""
    before = _tree(*roots, skip=skip)
    rc, err = _run(argv, capsys)
    line = _assert_one_line(rc, err, *fragments)
    assert _tree(*roots, skip=skip) == before
    return line


def _fake_checkpoint(argv, path, *, step=0, **extra):
    """An untrained model of ``step`` saved like a step checkpoint of this framework."""
    from experiment.builders import build_model
    from experiment.config import parse_config

    from methods.stack import build_method

    cfg = parse_config([str(a) for a in argv])
    model = build_model(cfg, step, method=build_method(cfg), pretrained=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"epoch": 1, "model_state": model.state_dict(), "best_score": 0.0, "trainer_state": {}, **extra}, path)
    return cfg


def _step0_path(out):
    return os.path.join(str(out), "ckpt", "15-5-voc_Experiment_0.pth")


# ----------------------------------------------------------------------------------------------- up-front checks
def test_missing_data_root(tmp_path, capsys):
    args = smoke_args(str(tmp_path / "nowhere"), tmp_path / "out")
    _check(args, capsys, [tmp_path], "does not exist", "nowhere", "--data_root")


def test_empty_data_root(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = smoke_args(str(tmp_path / "empty"), tmp_path / "out")
    _check(args, capsys, [tmp_path], "empty folder", "--data_root")


def test_missing_split_file(data_copy, tmp_path, capsys):
    os.remove(os.path.join(data_copy, "splits", "val.txt"))
    args = smoke_args(data_copy, tmp_path / "out")
    _check(args, capsys, [tmp_path], "split file", "val.txt", "--data_root")


@pytest.mark.parametrize("which", ["image", "label"])
def test_listed_file_missing(data_copy, tmp_path, capsys, which):
    with open(os.path.join(data_copy, "splits", "train_aug.txt")) as handle:
        first = handle.readline().split()
    victim = os.path.join(data_copy, first[0 if which == "image" else 1].lstrip("/"))
    os.remove(victim)
    args = smoke_args(data_copy, tmp_path / "out")
    _check(args, capsys, [tmp_path], "do not exist", os.path.basename(victim), "restore")


@pytest.mark.parametrize("flag, value, fragments", [
    ("--dataset", "pascal", ("unknown dataset 'pascal'", "voc", "ade", "cityscapes")),
    ("--task", "15-7", ("unknown task '15-7'", "15-5", "15-1")),
])
def test_unknown_dataset_or_task(tiny_voc, tmp_path, capsys, flag, value, fragments):
    args = smoke_args(tiny_voc, tmp_path / "out")
    args[args.index(flag) + 1] = value
    _check(args, capsys, [tmp_path, tiny_voc], *fragments)


def test_unknown_method_lists_valid_names(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", extra=["--method", "NotAMethod"])
    before = _tree(tmp_path)
    rc, err = _run(args, capsys)
    assert rc == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if "error:" in ln][-1]
    assert "NotAMethod" in line and all(m in line for m in ("FT", "MiB", "PLOP", "EWC"))
    assert _tree(tmp_path) == before


def test_step_outside_task(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(2,))
    _check(args, capsys, [tmp_path, tiny_voc], "--step 2", "outside task 15-5", "0..1")


def test_lr_list_does_not_match_steps(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(0, 1), extra=["--lr", "0.01", "0.001", "0.0001"])
    _check(args, capsys, [tmp_path, tiny_voc], "--lr has 3 values", "--step has 2", "one lr per step")


@pytest.mark.parametrize("att", ["150", "-5"])
def test_att_outside_range(tiny_voc, tmp_path, capsys, att):
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--method", "MiB", "--att", att])
    _check(args, capsys, [tmp_path, tiny_voc], f"--att {att}", "outside (0, 100]")


def test_val_every_iters_without_the_selection_is_refused(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", extra=["--val_every_iters", "auto"])
    _check(args, capsys, [tmp_path], "--val_every_iters auto validates for the model selection only",
           "--select_best_on_val")


@pytest.mark.parametrize("flags, fragments", [
    (["--method", "MiB", "--pckd_weights", "1", "1", "1", "1", "1", "1"],
     ["error: --pckd_weights belongs to --method RCIL (this run: --method MiB)"]),
    (["--method", "FT", "--dropclass_alpha", "0.5"],
     ["error: --dropclass_alpha belongs to DropClass, which is off in this run: turn it on with --dropclass"]),
    (["--method", "PLOP", "--pseudo_thresh", "0.7"], ["--pseudo_thresh belongs to --method SSUL or SSUL-M"]),
    (["--method", "SSUL", "--pod", "local"], ["--pod belongs to the pod loss term, which --method SSUL does not use"]),
], ids=["pckd-without-RCIL", "dropclass-flag-without-dropclass", "ssul-flag-with-PLOP", "pod-with-SSUL"])
def test_flag_of_an_inactive_plugin_names_its_owner(tiny_voc, tmp_path, capsys, flags, fragments):
    _check(smoke_args(tiny_voc, tmp_path / "out", extra=flags), capsys, [tmp_path], *fragments)


def test_previous_checkpoint_missing(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--method", "MiB"])
    _check(args, capsys, [tmp_path, tiny_voc], "previous-step checkpoint not found", _step0_path(tmp_path / "out"),
           "--step 0", "--step_ckpt")


def test_previous_checkpoint_has_other_class_layout(tiny_voc, tmp_path, capsys):
    other = tmp_path / "other" / "10-1.pth"
    _fake_checkpoint(smoke_args(tiny_voc, tmp_path / "o2", task="10-1"), str(other))  # classes [11]
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--method", "MiB", "--step_ckpt", str(other)])
    _check(args, capsys, [tmp_path, tiny_voc], str(other), "classes per step [11]", "expected [16]", "--task")


def test_channel_mask_of_wrong_size(tiny_voc, tmp_path, capsys):
    from methods.awt import channels_path

    args = smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--method", "MiB", "--att", "25"])
    cfg = _fake_checkpoint(args, _step0_path(tmp_path / "out"))
    mask_path = channels_path(cfg, 1)
    os.makedirs(os.path.dirname(mask_path))
    torch.save(torch.ones(100, dtype=torch.bool), mask_path)
    _check(args, capsys, [tmp_path, tiny_voc], mask_path, "shape [100]", "needs [256]", "delete it")


@pytest.mark.parametrize("flag", ["--checkpoint", "--results_dir"])
def test_output_folder_not_writable(tiny_voc, tmp_path, capsys, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = smoke_args(tiny_voc, tmp_path / "out")
    args[args.index(flag) + 1] = str(blocker / "sub")
    _check(args, capsys, [tmp_path, tiny_voc], "cannot write to", str(blocker / "sub"), flag)
    assert not (tmp_path / "out").exists()  # the other output folders were not created either


def test_resume_with_nothing_to_resume(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", extra=["--resume"])
    _check(args, capsys, [tmp_path, tiny_voc], "--resume", "nothing to resume", ".partial.pth", "drop --resume")


def test_ckpt_missing(tiny_voc, tmp_path, capsys):
    args = smoke_args(tiny_voc, tmp_path / "out", extra=["--ckpt", str(tmp_path / "nope.pth")])
    _check(args, capsys, [tmp_path, tiny_voc], "--ckpt", "nope.pth", "does not exist")


def test_partial_checkpoint_from_other_configuration(tiny_voc, tmp_path, capsys):
    from experiment.config import dump

    out = tmp_path / "out"
    args = smoke_args(tiny_voc, out)
    other = args.copy()
    other[other.index("--batch_size") + 1] = "4"
    from experiment.config import parse_config

    partial = os.path.join(str(out), "ckpt", "15-5-voc_Experiment_0.partial.pth")
    _fake_checkpoint(other, partial, config=dump(parse_config(other)), optimizer_state={}, scheduler_state={})
    line = _check(args, capsys, [tmp_path, tiny_voc], partial, "--batch_size 4 there, 8 now", "--no_auto_resume",
                  skip=(str(out / "cache"),))
    assert "other settings" in line


def test_debug_shows_the_traceback(tiny_voc, tmp_path):
    import run
    from utils.errors import UserError

    with pytest.raises(UserError, match="unknown task"):
        run.main(smoke_args(tiny_voc, tmp_path / "out", task="15-7", extra=["--debug"]))


# ----------------------------------------------------------------------------------------------- found while running
def _listed(root, split="train_aug.txt"):
    with open(os.path.join(root, "splits", split)) as handle:
        return [[os.path.join(root, f.lstrip("/")) for f in ln.split()] for ln in handle if ln.strip()]


def _runtime_check(data, tmp_path, capsys, *fragments, workers=0):
    out = tmp_path / "out"
    args = smoke_args(data, out, extra=["--num_workers", str(workers), "--lr", "0.01"])
    # the index caches under --cache_root are derived data and may be written before the bad file is met
    return _check(args, capsys, [tmp_path], *fragments, skip=(str(out / "cache"),))


@pytest.mark.parametrize("workers", [0, 1])
def test_image_that_cannot_be_decoded(data_copy, tmp_path, capsys, workers):
    for img, _ in _listed(data_copy):
        with open(img, "r+b") as handle:
            handle.truncate(20)
    line = _runtime_check(data_copy, tmp_path, capsys, "cannot decode image", "JPEGImages", "replace or remove",
                          workers=workers)
    assert "Caught" not in line and "worker" not in line


def test_label_that_cannot_be_decoded(data_copy, tmp_path, capsys):
    for _, lbl in _listed(data_copy):
        with open(lbl, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n garbage")
    _runtime_check(data_copy, tmp_path, capsys, "cannot decode label", "SegmentationClassAug", "replace or remove")


def test_label_size_differs_from_image(data_copy, tmp_path, capsys):
    for _, lbl in _listed(data_copy):
        arr = np.asarray(Image.open(lbl))
        Image.fromarray(np.ascontiguousarray(arr[:-3, :])).save(lbl)
    _runtime_check(data_copy, tmp_path, capsys, "is 32x29 but its image", "must have the same size")


def test_label_values_outside_classes(data_copy, tmp_path, capsys):
    lbl = _listed(data_copy)[0][1]
    arr = np.array(Image.open(lbl))
    arr[0, 0] = 77
    Image.fromarray(arr).save(lbl)
    _runtime_check(data_copy, tmp_path, capsys, os.path.basename(lbl), "[77]", "outside 0..20 and 255")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_voc, tmp_path, capsys, monkeypatch):
    """NaN injected in epoch 1: exit 2 naming step/epoch/iteration/terms; the epoch-0 in-step checkpoint is intact."""
    import train

    out = tmp_path / "out"
    partial = os.path.join(str(out), "ckpt", "15-5-voc_Experiment_0.partial.pth")
    state = {"epoch": 0, "calls": 0, "partial": None}
    orig_epoch, orig_losses = train.train_one_epoch, train._compute_losses

    def epoch_hook(*args, epoch, **kwargs):
        state["epoch"] = epoch
        if epoch == 1:
            state["partial"] = _tree(os.path.dirname(partial))
        return orig_epoch(*args, epoch=epoch, **kwargs)

    def losses_hook(*args, **kwargs):
        losses = orig_losses(*args, **kwargs)
        if state["epoch"] == 1:
            state["calls"] += 1
            if state["calls"] == 2:
                return {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(train, "train_one_epoch", epoch_hook)
    monkeypatch.setattr(train, "_compute_losses", losses_hook)
    args = smoke_args(tiny_voc, out, extra=["--lr", "0.01", "--epochs", "3", "--print_interval", "100"])
    rc, err = _run(args, capsys)
    line = _assert_one_line(rc, err, "non-finite loss at step 0 epoch 2/3, iteration 2/", "loss_ce=nan",
                            "last good checkpoint is kept", "--lr")
    assert state["partial"] and list(state["partial"]) == [partial]
    assert _tree(os.path.dirname(partial)) == state["partial"]  # untouched
    assert not os.path.exists(_step0_path(out))
    assert not (out / "results").exists() or not os.listdir(out / "results")
    assert line
