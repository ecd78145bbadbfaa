"""WILSON through run.py on synthetic VOC 15-5: its published command lines, no pixel label reaching a loss term,
invariance to the pixel content of the weak step's labels, the optimiser groups and schedule, kill and resume."""
from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.synthetic import generate
from experiment.config import parse_config
from methods import build_method
from methods.wilson import WILSON, WilsonLoss, with_prior
from tests.conftest import interrupt_at_epoch, smoke_args

# fcdl94/WILSON run.sh and coco.sh (the weak step's line; paths and the launcher left out)
RUN_SH_STEP0 = "--num_workers 4 --sample_num 8 --name FT_bce --step 0 --bce --lr 0.01 --dataset voc --task 15-5 " \
               "--batch_size 24 --overlap --val_interval 2 --epochs 30"
RUN_SH_STEP1 = "--num_workers 4 --sample_num 8 --name OURS --step 1 --weakly --dataset voc --task 15-5 --batch_size 24 " \
               "--overlap --val_interval 2 --alpha 0.5 --lr 0.001 --step_ckpt ckpt.pth --loss_de 1 --lr_policy warmup " \
               "--affinity --epochs 40"
COCO_SH_STEP1 = "--num_workers 4 --sample_num 8 --name OURS --step 1 --weakly --dataset coco-voc --task voc " \
                "--batch_size 24 --epochs 30 --val_interval 2 --alpha 0.9 --lr 0.001 --step_ckpt ckpt.pth --loss_de 1 " \
                "--lr_policy warmup --affinity"
WEAK = ["--weakly", "--alpha", "0.5", "--loss_de", "1", "--lr_policy", "warmup", "--affinity", "--pseudo_ep", "1",
        "--epochs", "3", "--lr", "0.001", "--name", "OURS"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("wilson") / "voc"
    generate(str(root), "voc", size=32, n_train=60, n_val=24, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def step0(voc, tmp_path_factory):
    """WILSON's step 0 (FT with BCE), shared by the weak-step runs."""
    import run
    out = tmp_path_factory.mktemp("wilson_step0")
    assert run.main(smoke_args(voc, out, extra=["--bce", "--lr", "0.01", "--name", "FT_bce", "--overlap"])) == 0
    return str(out / "ckpt" / "15-5-voc_FT_bce_0.pth")


def _weak_args(voc, out, step0, extra=()):
    return smoke_args(voc, out, steps=(1,), extra=[*WEAK, "--step_ckpt", step0, "--overlap", *extra])


def test_wilson_command_lines_parse_and_select_wilson():
    for line, alpha in ((RUN_SH_STEP1, 0.5), (COCO_SH_STEP1, 0.9)):
        cfg = parse_config(shlex.split(line))
        stack = build_method(cfg)
        assert isinstance(stack.method, WILSON) and cfg.alpha == alpha and cfg.affinity and cfg.loss_de == 1
        assert cfg.lr_policy == "warmup" and cfg.pseudo_ep == 5 and cfg.lr_pseudo == 0.01 and cfg.lr_head == 10
    cfg = parse_config(shlex.split(RUN_SH_STEP0))
    assert type(build_method(cfg).method).__name__ == "FT" and cfg.bce
    assert parse_config(shlex.split(RUN_SH_STEP1.replace("--alpha 0.5 ", ""))).alpha == 0.5, "WILSON's default"


def test_groups_and_the_warmup_schedule_follow_the_reference(voc):
    from experiment.builders import build_model
    from methods.base import StepContext
    from utils.optim import build_optimizer, build_scheduler

    cfg = parse_config(shlex.split(RUN_SH_STEP1) + ["--data_root", voc, "--backbone", "resnet18", "--norm_act", "abn",
                                                   "--no_pretrained", "--pseudo_ep", "2", "--epochs", "5"])
    stack = build_method(cfg)
    model = build_model(cfg, 1, method=stack, pretrained=False)
    stack.method.prepare_model(StepContext(step=1, classes=[16, 5], model=model))
    groups = stack.param_groups(model, 0.001, 1)
    assert [g["lr"] for g in groups] == [0.001, 0.01, 0.01, 0.01]  # body, head x10, classifiers x10, localizer 0.01
    assert groups[-1]["params"] == list(stack.method.localizer.parameters())
    optimizer = build_optimizer(groups, cfg, 0.001)
    max_iters, per_epoch = 50, 10
    scheduler = build_scheduler(optimizer, cfg, max_iters)
    seen = []
    for _ in range(max_iters):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for it, lrs in enumerate(seen):  # WILSON's WarmUpPolyLR with start_decay = pseudo_ep x iterations per epoch
        factor = 1.0 if it < 2 * per_epoch else (1 - it / max_iters) ** 0.9
        assert lrs == pytest.approx([0.001 * factor, 0.01 * factor, 0.01 * factor, 0.01 * factor], rel=1e-12)


@pytest.mark.slow
def test_no_pixel_label_reaches_a_term_and_label_pixels_do_not_matter(voc, step0, tmp_path, monkeypatch):
    """Every batch the weak step's terms see has all-255 labels; rewriting the pixels of its training labels (same
    class sets: each label flipped left-right) leaves the trained weights bit-identical, AWT's mask from image labels
    (--awt_weak whole, the default) included."""
    import run
    seen = []
    original = WilsonLoss.__call__

    def spy(self, batch):
        seen.append(bool((batch.labels == 255).all()) and bool((batch.original_labels == 255).all()))
        assert set(batch.aux) == {"img_labels"}
        return original(self, batch)

    monkeypatch.setattr(WilsonLoss, "__call__", spy)
    awt = ["--att", "25", "--mask_att"]
    assert run.main(_weak_args(voc, tmp_path / "a", step0, awt)) == 0
    assert seen and all(seen)
    data = tmp_path / "flipped"
    shutil.copytree(voc, data)
    for label in (data / "SegmentationClassAug").glob("synt_*.png"):
        image = Image.open(label)
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert not np.array_equal(np.asarray(flipped), np.asarray(image)) or np.asarray(image).max() == 0
        flipped.save(label)
    assert run.main(_weak_args(str(data), tmp_path / "b", step0, awt)) == 0
    masks = [next((tmp_path / run_ / "channels").rglob("step1_union_att25_*_weakwhole_*[0-9a-f].pt")) for run_ in "ab"]
    assert torch.equal(torch.load(masks[0], weights_only=True), torch.load(masks[1], weights_only=True))
    a = torch.load(tmp_path / "a" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "b" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)["model_state"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_weak_step_killed_and_resumed_gives_the_same_bytes(voc, step0, tmp_path, monkeypatch):
    import run
    import train
    assert run.main(_weak_args(voc, tmp_path / "full", step0)) == 0
    args = _weak_args(voc, tmp_path / "killed", step0)
    original = interrupt_at_epoch(monkeypatch, 2)  # after the localizer's warm-up epoch and one pseudo-label epoch
    assert run.main(args) == 130
    assert (tmp_path / "killed" / "ckpt" / "15-5-voc_OURS_1.partial.pth").exists()
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert run.main(args) == 0
    a = torch.load(tmp_path / "full" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    loc_a = a["trainer_state"]["methods"]["WILSON"]["localizer"]
    loc_b = b["trainer_state"]["methods"]["WILSON"]["localizer"]
    assert all(torch.equal(loc_a[k], loc_b[k]) for k in loc_a)
    rows = (tmp_path / "full" / "results" / "test_voc_15-5_OURS.csv").read_text()
    assert rows == (tmp_path / "killed" / "results" / "test_voc_15-5_OURS.csv").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--unce"], "--unce changes the pixel-label loss of steps > 0"),
    (["--pseudo", "entropy"], "the pseudo loss term reads pixel labels"),
])
def test_what_a_weak_step_cannot_do_is_refused_in_one_line(voc, step0, tmp_path, capsys, extra, message):
    import run
    assert run.main(_weak_args(voc, tmp_path, step0, extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error:")


def test_table4_priors_replace_the_old_channels_as_documented():
    z = torch.randn(2, 7, 3, 3)
    old = torch.randn(2, 4, 3, 3)
    term = lambda prior: WilsonLoss(localizer=None, progress=None, alpha=0.5, cam="ngwp", l_seg=1.0,  # noqa: E731
                                    pseudo_ep=0, affinity=False, prior=prior)
    assert torch.equal(with_prior(z, old, "learned"), z)
    fixed = with_prior(z, old, "fixed")
    assert torch.equal(fixed[:, :4], old) and torch.equal(fixed[:, 4:], z[:, 4:])
    none = with_prior(z, old, "none")
    assert (none[:, 0] == 1).all() and (none[:, 1:4] == 0).all() and torch.equal(none[:, 4:], z[:, 4:])
    assert term("none").prior_loss(z, old) == 0 and term("fixed").prior_loss(z, old) == 0
    expected = torch.nn.functional.cross_entropy(z[:, :4], old.argmax(1))
    assert torch.equal(term("ce").prior_loss(z, old), expected)
