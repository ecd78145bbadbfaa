"""AWT at weak steps (--weakly): masks from image labels (--awt_weak whole) or from WILSON's localizer after its
warm-up (--awt_weak localizer, the initialisation deferred to --pseudo_ep); the parts against explicit computations,
the refusals, and run.py killed across the deferred initialisation and resumed to the same bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.synthetic import generate
from experiment.config import parse_config
from methods.attribution import attribution_masks, channel_importance
from methods.wilson import pseudo_label_map
from methods.wilson_losses import mask_by_image_labels, pseudo_gtmask
from segmentation_module import make_model
from tests.conftest import kill_and_resume, smoke_args
from utils.errors import UserError
from utils.optim import forget_state_of_changed


def test_image_labels_give_whole_image_masks_per_group():
    img_labels = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 0, 0]]).long()  # classes 1..3 of three images
    masks = attribution_masks(img_labels, (2, 3), [[2], [1, 3], [2, 3]])
    expected = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]]).float()  # image b holds a class of group k
    assert masks.shape == (3, 3, 2, 3)
    assert torch.equal(masks, expected[:, :, None, None].expand(-1, -1, 2, 3))


def test_per_class_whole_image_scores_are_the_union_scores_of_the_images_holding_the_class():
    torch.manual_seed(0)
    model = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3]).eval()
    images = torch.randn(6, 3, 32, 32)
    img_labels = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1],
                               [0, 0, 1, 1]]).float()  # classes 3 and 4 are the step's

    def batches(idx, targets):
        return [(images[idx], targets[idx])]

    per_class = channel_importance(model, batches(list(range(6)), img_labels), [3, 4], per_class=True)
    for row, cls in enumerate((3, 4)):
        holding = [i for i in range(6) if img_labels[i, cls - 1] > 0]
        union = channel_importance(model, batches(holding, torch.zeros(6, 32, 32).long()), [cls], mask_att=False)
        assert int(per_class.n_used[row]) == len(holding)
        assert torch.allclose(per_class.scores[row], union.scores[0], atol=1e-6)


def test_pseudo_label_map_is_the_single_positive_class_of_the_self_training_masks():
    torch.manual_seed(1)
    refined = torch.rand(2, 4, 3, 3).softmax(1)
    img_labels = torch.tensor([[0, 1, 1], [1, 0, 0]]).float()
    labels = pseudo_label_map(refined, img_labels)
    positive = pseudo_gtmask(mask_by_image_labels(refined, img_labels))
    for b in range(2):
        for y in range(3):
            for x in range(3):
                on = positive[b, :, y, x].nonzero().flatten().tolist()
                assert int(labels[b, y, x]) == (on[0] if len(on) == 1 else 255)
    assert set(labels[1].unique().tolist()) <= {0, 1, 255}  # only the image's classes and the background


def test_optimiser_state_is_forgotten_exactly_where_weights_were_reinitialised():
    weight = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.full_like(weight, 0.5)
    optimizer.step()
    before = {weight: weight.detach().clone()}
    with torch.no_grad():
        weight[1, 2] = 7.0
        weight[2] = 3.0
    assert forget_state_of_changed(optimizer, before) == 5
    buffer = optimizer.state[weight]["momentum_buffer"]
    changed = torch.zeros(3, 4, dtype=torch.bool)
    changed[1, 2] = True
    changed[2] = True
    assert (buffer[changed] == 0).all() and (buffer[~changed] == 0.5).all()


@pytest.mark.parametrize("extra, message", [
    (["--awt_weak", "whole"], "this run has none"),
    (["--weakly", "--awt_weak", "localizer"], "which this run does not compute"),
])
def test_awt_weak_where_it_does_nothing_is_refused(extra, message):
    from methods import build_method
    with pytest.raises(UserError, match=message):
        build_method(parse_config(["--dataset", "voc", "--task", "15-5", "--step", "1", *extra]))


def test_the_localizer_masks_need_run_py(tmp_path):
    from methods.awt import compute_mask
    cfg = parse_config(["--dataset", "voc", "--task", "15-5", "--step", "1", "--weakly", "--att", "25",
                        "--awt_weak", "localizer"])
    with pytest.raises(UserError, match="exists only while run.py trains the step"):
        compute_mask(cfg, 1, None, "cpu", dataset=[])


# ------------------------------------------------------------------------------------------------ through run.py
WEAK = ["--weakly", "--alpha", "0.5", "--loss_de", "1", "--lr_policy", "warmup", "--affinity", "--pseudo_ep", "1",
        "--lr_pseudo", "1.0", "--epochs", "3", "--lr", "0.001", "--name", "OURS", "--output_stride", "8",
        "--att", "25", "--mask_att", "--overlap"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("awt_weak") / "voc"
    generate(str(root), "voc", size=32, n_train=60, n_val=24, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def step0(voc, tmp_path_factory):
    import run
    out = tmp_path_factory.mktemp("awt_weak_step0")
    assert run.main(smoke_args(voc, out, extra=["--bce", "--lr", "0.01", "--name", "FT_bce", "--overlap",
                                                "--output_stride", "8"])) == 0
    return str(out / "ckpt" / "15-5-voc_FT_bce_0.pth")


def _args(voc, out, step0, extra=()):
    return smoke_args(voc, out, steps=(1,), extra=[*WEAK, "--step_ckpt", step0, *extra])


def test_localizer_masks_that_come_too_late_are_refused_in_one_line(voc, step0, tmp_path, capsys):
    import run
    assert run.main(_args(voc, tmp_path, step0, ["--awt_weak", "localizer", "--pseudo_ep", "3"])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "never reaches" in err and "--pseudo_ep" in err


@pytest.mark.slow
def test_deferred_initialisation_killed_and_resumed_gives_the_same_bytes(voc, step0, tmp_path, monkeypatch, caplog):
    """--awt_weak localizer: the new classifier keeps its random weights through the warm-up epoch, is initialised
    from the localizer's masks at the start of epoch --pseudo_ep (its momentum reset), and a run killed right after
    that initialisation resumes from the checkpoint before it to the same bytes."""
    import run
    import train
    extra = ["--awt_weak", "localizer"]
    weights = []
    original_epoch = train.train_one_epoch

    def record(model, *args, epoch, **kwargs):  # the new classifier as each epoch starts
        weights.append(train.unwrap(model).cls[-1].weight.detach().clone())
        return original_epoch(model, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", record)
    with caplog.at_level("INFO"):
        assert run.main(_args(voc, tmp_path / "full", step0, extra)) == 0
    assert "weak step: the localizer's masks" in caplog.text and "optimiser state of the" in caplog.text
    masks = list((tmp_path / "full" / "channels").rglob("step1_union_att25_*_weaklocalizer_*[0-9a-f].pt"))
    assert len(masks) == 1
    mask = torch.load(masks[0], weights_only=True)
    assert int(mask.sum()) == 64
    change = (weights[1] - weights[0]).abs().flatten(2).amax((0, 2))  # per input channel
    # the background weight added on the selected channels at the start of epoch 1; elsewhere only weight decay
    assert float(change[~mask].max()) < 1e-3 * float(change[mask].max())

    monkeypatch.setattr(train, "train_one_epoch", original_epoch)
    args = _args(voc, tmp_path / "killed", step0, extra)
    kill_and_resume(monkeypatch, args, 1)  # after the deferred initialisation of epoch 1, before training
    a = torch.load(tmp_path / "full" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ckpt" / "15-5-voc_OURS_1.pth", weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    rows = (tmp_path / "full" / "results" / "test_voc_15-5_OURS.csv").read_text()
    assert rows == (tmp_path / "killed" / "results" / "test_voc_15-5_OURS.csv").read_text()


# ------------------------------------------------------------------------------------------------ CSD on the localizer
def test_csd_composes_batches_from_the_localizer_masks():
    from methods.wilson_csd import LocalizerCSD
    n_old, stride = 3, 4
    new = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float32)
    part = LocalizerCSD(img_labels_new=new, n_old=n_old, stride=stride, pairs=0, lambdas="fg-bg", seed=0)
    images = torch.arange(6 * 3 * 16 * 16, dtype=torch.float32).reshape(6, 3, 16, 16)
    img_labels = torch.zeros(6, 2 + 3)
    img_labels[:, 2:] = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])

    def labeler(x, y):  # sources get class (n_old + their class) in a 2x2 block of the 4x4 grid, background elsewhere
        out = torch.zeros(x.shape[0], 4, 4, dtype=torch.long)
        for i in range(x.shape[0]):
            out[i, 1:3, 1:3] = n_old + int(y[i, 2:].argmax())
        return out

    composed, labels, appended = part.compose(images, img_labels, labeler, epoch=1, step=1)
    assert appended.n == 6 and appended.k == 1  # one anchor (row 0, two new classes), a quarter of 6 -> 1
    source_row = [i for i in range(6) if torch.equal(composed[6], images[i])]
    assert source_row and source_row[0] in (1, 2, 4, 5)  # a single-new-class image of the batch
    fg, bg = composed[7], composed[8]
    (fg_where, bg_where), (fg_shift, bg_shift) = appended.wheres[0], appended.shifts[0]
    ys, xs = fg_where.nonzero(as_tuple=True)
    assert len(ys) == 64 and torch.equal(fg[:, ys, xs], composed[6][:, ys - fg_shift[0], xs - fg_shift[1]])
    assert torch.equal(fg[:, ~fg_where], images[0][:, ~fg_where]) and torch.equal(bg[:, ~bg_where], images[0][:, ~bg_where])
    assert labels.shape == (9, 5) and torch.equal(labels[6], img_labels[source_row[0]])
    z = torch.randn(9, 6, 4, 4)
    losses = part.loss(z, appended)
    assert losses["loss_csd_fg"] > 0 and set(losses) == {"loss_csd_fg", "loss_csd_bg"}


@pytest.mark.slow
def test_csd_at_a_weak_step_runs_and_reads_no_pixel_label(voc, step0, tmp_path, monkeypatch, caplog):
    import run
    from methods.wilson import WilsonLoss
    seen = []
    original = WilsonLoss.__call__

    def spy(self, batch):
        seen.append(bool((batch.labels == 255).all()))
        return original(self, batch)

    monkeypatch.setattr(WilsonLoss, "__call__", spy)
    args = [a for a in _args(voc, tmp_path, step0, ["--csd"]) if a not in ("--att", "25", "--mask_att")]
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    assert seen and all(seen)
    line = next(r.getMessage() for r in caplog.records if "epoch 3/3 done" in r.getMessage())
    assert "loss_csd_fg=" in line and float(line.split("loss_csd_fg=")[1].split()[0]) > 0
