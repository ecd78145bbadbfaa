"""attribute.py / attribute_class.py on a tiny on-disk synthetic VOC and a saved step-0 checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("dataset.synthetic")
segmentation_module = pytest.importorskip("segmentation_module")

from methods import awt, channel_masks  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dataset.synthetic import generate
    from utils.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("awt_cli")
    generate(str(root / "data" / "voc"), "voc", size=64, n_train=20, n_val=20, seed=0)
    for task, classes in (("15-1", [16]), ("5-3", [6])):
        torch.manual_seed(0)
        model = segmentation_module.make_model(backbone="resnet18", norm_act="abn", output_stride=16,
                                               classes=classes)
        save_checkpoint(str(root / "ckpt" / f"{task}-voc_t_0.pth"), model_state=model.state_dict())
    return root


def common(root, task="15-1"):
    return ["--dataset", "voc", "--task", task, "--step", "1", "--name", "t", "--checkpoint", str(root / "ckpt"),
            "--data_root", str(root / "data" / "voc"), "--cache_root", str(root / "cache"),
            "--channels_dir", str(root / "channels"), "--backbone", "resnet18", "--norm_act", "abn",
            "--no_pretrained", "--crop_size", "64", "--device", "cpu", "--batch_size", "4", "--att", "25",
            "--mask_att"]


def run_cli(script, args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_attribute_writes_the_mask_run_py_finds(workdir):
    from experiment.config import parse_config

    args = common(workdir) + ["--att_plot"]
    proc = run_cli("attribute.py", args, workdir)
    assert proc.returncode == 0, proc.stderr
    cfg = parse_config(args)
    path = awt.channels_path(cfg, 1)
    assert os.path.isabs(path) and os.path.isfile(path), proc.stdout  # run.py computes the same path
    mask = torch.load(path, weights_only=True)
    assert mask.dtype == torch.bool and mask.shape == (256,) and int(mask.sum()) == 64
    scores = torch.load(channel_masks.scores_path(path), weights_only=True)
    assert scores["meta"]["new_classes"] == [16] and scores["n_images"] > 0
    assert os.path.isfile(channel_masks.plot_path(path))
    # run.py's entry point loads (and validates) exactly this file for the old model of the same checkpoint
    from experiment.checkpoints import load_old_model
    from methods.stack import build_method

    model_old = load_old_model(cfg, 1, torch.device("cpu"), method=build_method(cfg))
    assert torch.equal(awt.compute_or_load_mask(cfg, 1, model_old, "cpu"), mask)


def test_attribute_class_writes_one_mask_per_class(workdir):
    args = common(workdir, "5-3") + ["--att", "10", "--crop_size", "128"]
    proc = run_cli("attribute_class.py", args, workdir)
    if proc.returncode != 0 and "skipped" in proc.stderr:
        pytest.skip("a new class vanished under nearest downsampling in this tiny dataset: " + proc.stderr)
    assert proc.returncode == 0, proc.stderr
    from experiment.config import parse_config

    path = awt.channels_path(parse_config(args), 1, per_class=True)
    mask = torch.load(path, weights_only=True)
    assert mask.shape == (3, 256) and mask.sum(1).tolist() == [26, 26, 26]


def test_missing_previous_checkpoint_is_a_one_line_error(workdir):
    args = common(workdir) + ["--name", "nothing_trained"]
    proc = run_cli("attribute.py", args, workdir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "checkpoint" in lines[0], proc.stderr
    assert not (workdir / "channels" / "15-1-voc_nothing_trained").exists()


def test_step_zero_and_bad_att_are_refused(workdir):
    for extra in (["--step", "0"], ["--att", "0"], ["--att", "120"]):
        proc = run_cli("attribute.py", common(workdir) + extra, workdir)
        assert proc.returncode == 2 and proc.stderr.startswith("error:"), (extra, proc.stderr)
