"""DropClass (modules/dropclass.py, methods/dropclass.py): the forward against an independent computation of
docs/dropclass.md's formulas (gradient into the classifier weights through the re-weighting included), the losses
and schedules, inference through the drop path, frozen importance rows across a step, runs through run.py, the
co-occurring synthetic data and the erase-a-class evaluation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import smoke_args
from methods.base import Batch
from methods.classification import Classification
from methods.dropclass import DropClassLoss, droppable_classes, schedule, suppression
from segmentation_module import ModelSpec, build_model_from_spec
from utils import loss as L


def _model(classes=(3, 2), readout="drop", rows="live", seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(backbone="resnet18", norm_act="abn", pooling=None).with_wrapper("dropclass", readout=readout,
                                                                                     rows=rows)
    model = build_model_from_spec(spec, list(classes))
    with torch.no_grad():  # classifier rows with both signs, a g that is not ~0
        for c in model.cls:
            c.weight.normal_(0, 0.5)
        model.drop.conv.weight.normal_(0, 0.1)
    return model


def _independent_drop(model, a: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, train: bool,
                      detach_s: bool = False) -> torch.Tensor:
    """The spec's forward, written out: S = mean over kept classes of relu(W_c); A_drop = relu(BN(conv(A * S)));
    logits = W A_drop + b (every classifier), at feature resolution."""
    rows = F.relu(w.detach() if detach_s else w)
    s = (rows * keep[:, None].float()).sum(0) / keep.float().sum()
    g = model.drop
    h = F.conv2d(a * s[None, :, None, None], g.conv.weight, g.conv.bias)
    if train:
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = g.bn.running_mean, g.bn.running_var
    h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + g.bn.eps)
    h = F.relu(h * g.bn.weight[None, :, None, None] + g.bn.bias[None, :, None, None])
    bias = torch.cat([c.bias for c in model.cls])
    return F.conv2d(h, w[:, :, None, None], bias)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_and_gradient_match_the_spec(train):
    model = _model()
    model.train(train)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, False, True, True, True])  # class 1 dropped
    logits, extras = model(x, ret_intermediate=True, keep=keep)
    ours = extras["drop_logits_small"] if train else extras["sem_logits_small"]  # eval answers with the drop path
    a = extras["pre_logits"].detach()
    w = model.classifier_rows().detach().clone().requires_grad_(True)
    expected = _independent_drop(model, a, w, keep, train)
    assert torch.allclose(ours, expected, atol=1e-5)
    if train:  # the logits of a training forward are the plain path's
        plain = torch.cat([c(extras["pre_logits"]) for c in model.cls], 1)
        assert torch.allclose(logits, F.interpolate(plain, size=(32, 32), mode="bilinear", align_corners=False))
    # the gradient into W: through the classifiers and through the re-weighting S
    r = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    model.zero_grad()
    (ours * r).sum().backward()
    (expected * r).sum().backward()
    got = torch.cat([c.weight.grad.flatten(1) for c in model.cls])
    assert torch.allclose(got, w.grad, atol=1e-4 * float(w.grad.abs().max()))
    w_fixed_s = w.detach().clone().requires_grad_(True)
    (_independent_drop(model, a, w_fixed_s, keep, train, detach_s=True) * r).sum().backward()
    assert not torch.allclose(w.grad, w_fixed_s.grad, atol=1e-6)  # the re-weighting's share is not zero


def test_inference_keeps_every_class_and_plain_readout_is_the_classifier_on_a():
    model = _model(readout="drop").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    logits, extras = model(x)
    a = extras["pre_logits"]
    everything = torch.ones(5, dtype=torch.bool)
    expected = _independent_drop(model, a, model.classifier_rows(), everything, train=False)
    assert torch.allclose(logits, F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False),
                          atol=1e-5)
    plain = torch.cat([c(a) for c in model.cls], 1)
    assert not torch.allclose(expected, plain, atol=1e-3)
    model.drop.readout = "plain"
    assert torch.allclose(model(x)[0], F.interpolate(plain, size=(32, 32), mode="bilinear", align_corners=False))


def test_schedules_and_droppable_classes():
    assert schedule(0, 10) == (1.0, 0.0) and schedule(5, 10) == (0.5, 0.5) and schedule(9, 10) == (
        pytest.approx(0.1), pytest.approx(0.9))
    assert schedule(3, 10, "fixed", 0.25) == (0.5, 0.25)
    assert droppable_classes(0, 16, "labelled") == list(range(16))
    assert droppable_classes(16, 21, "labelled") == [0, 16, 17, 18, 19, 20]
    assert droppable_classes(16, 21, "all") == list(range(21))


def test_loss_is_lambda_ce_plus_dropped_ce_plus_suppression():
    gen = torch.Generator().manual_seed(3)
    logits, drop = torch.randn(2, 5, 8, 8, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    drop_small = torch.randn(2, 5, 4, 4, generator=gen)
    labels = torch.randint(0, 5, (2, 8, 8), generator=gen)
    labels[0, 0] = 255
    inner = Classification(kind="ce", n_old=0, icarl=None, icarl_importance=1.0, icarl_bkg=False, alpha=1.0,
                           gamma=2.0, ce_on_pseudo=False)
    term = DropClassLoss(inner, alpha=10.0)
    for z, lam in ((3, 0.7), (None, 0.4)):
        batch = Batch(images=torch.zeros(2, 3, 8, 8), labels=labels, logits=logits,
                      extras={"drop_logits": drop, "drop_logits_small": drop_small}, logits_old=None, extras_old=None,
                      n_old=0, n_new=5, aux={"dropclass": {"lambda": lam, "z": z}})
        out = term(batch)
        dropped = labels if z is None else labels.masked_fill(labels == z, 255)
        assert float(out["loss_ce"]) == pytest.approx(lam * float(L.cross_entropy(logits, labels).mean()))
        # the drop path's CE is DropClass's: mean over the valid pixels (255 and the dropped class left out)
        assert float(out["loss_ce_drop"]) == pytest.approx((1 - lam) * float(F.cross_entropy(drop, dropped,
                                                                                              ignore_index=255)))
        assert float(out["loss_ce_drop"]) != pytest.approx((1 - lam) * float(L.cross_entropy(drop, dropped).mean()))
        if z is None:
            assert "loss_sup" not in out
        else:
            prob = F.softmax(drop_small, 1)[:, z].mean()
            assert float(out["loss_sup"]) == pytest.approx(10 * float(prob)) and float(suppression(drop_small, z)) \
                == pytest.approx(float(prob))


def test_frozen_rows_carry_over_a_step_and_ignore_later_changes_of_old_weights():
    old = _model(classes=(3,), rows="frozen")
    new = _model(classes=(3, 2), rows="frozen", seed=1)
    assert new.drop.frozen_rows.shape == (3, 256) and old.drop.frozen_rows.shape == (0, 256)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cls.1.") for k in missing)
    assert new.drop.freeze_rows(new.classifier_rows()) == 3
    assert torch.equal(new.drop.frozen_rows, F.relu(old.classifier_rows()))
    s_before = new.drop.importance(new.classifier_rows())
    with torch.no_grad():
        new.cls[0].weight.add_(1.0)  # the old classifiers train on: the frozen part of S does not move
    assert torch.equal(new.drop.importance(new.classifier_rows()), s_before)
    again = _model(classes=(3, 2), rows="frozen", seed=2)  # a checkpoint of the step: rows loaded whole
    again.load_state_dict(new.state_dict())
    assert again.drop.freeze_rows(again.classifier_rows()) == 0
    assert torch.equal(again.drop.frozen_rows, new.drop.frozen_rows)


# ------------------------------------------------------------------------------------------------ data and runs
@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("dropclass") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=80, n_val=30, seed=0, cooccur=[(1, 2)], cooccur_prob=1.0)
    return str(root)


def _labels(root: str, split: str):
    listing = os.path.join(root, "splits", "train_aug.txt" if split == "train" else "val.txt")
    for line in open(listing).read().split():
        if line.endswith(".png"):
            yield np.array(Image.open(root + line))


def test_cooccurring_pairs_are_drawn_together_and_touching(cooc, tmp_path):
    from dataset.synthetic import generate

    with_1 = [lab for lab in _labels(cooc, "train") if (lab == 1).any()]
    assert with_1 and all((lab == 2).any() for lab in with_1)
    for lab in with_1:  # touching: a class-2 pixel within 3 px of a class-1 pixel
        near = F.max_pool2d(torch.from_numpy((lab == 1).astype(np.float32))[None, None], 7, 1, 3)[0, 0] > 0
        assert (near.numpy() & (lab == 2)).any()
    assert json.load(open(os.path.join(cooc, "SYNTHETIC.json")))["cooccur"] == [[1, 2]]
    plain = tmp_path / "plain"
    generate(str(plain), "voc", size=32, n_train=80, n_val=30, seed=0)
    same = [np.array_equal(a, b) for a, b in zip(_labels(cooc, "train"), _labels(str(plain), "train"))]
    untouched = [not ((a == 1).any() or (a == 2).any()) for a in _labels(str(plain), "train")]
    assert all(s for s, u in zip(same, untouched) if u)  # images without a pair member are unchanged


def test_fill_from_surroundings_and_erase_class():
    from dataset.erase import EraseClass, fill_from_surroundings

    image = torch.full((3, 9, 9), 50, dtype=torch.uint8)
    image[:, :, 5:] = 150
    hole = torch.zeros(9, 9, dtype=torch.bool)
    hole[3:6, 3:6] = True
    image[:, hole] = 255
    filled = fill_from_surroundings(image, hole)
    assert torch.equal(filled[:, ~hole], image[:, ~hole])
    assert int(filled[0, 4, 3]) == 50 and int(filled[0, 4, 5]) == 150 and 50 < int(filled[0, 4, 4]) < 150

    labels = [torch.tensor([[0, 2], [2, 1]]), torch.tensor([[0, 1], [1, 1]]), torch.tensor([[2, 2], [0, 0]])]
    items = [(torch.full((3, 2, 2), 10 * (i + 1), dtype=torch.uint8), lab) for i, lab in enumerate(labels)]
    erased = EraseClass(items, 2)
    assert len(erased) == 2 and erased.indices == [0, 2]
    image0, label0 = erased[0]
    assert label0.tolist() == [[0, 255], [255, 1]] and image0.dtype == torch.uint8
    control = EraseClass(items, 2, erase=False)
    image0c, label0c = control[0]
    assert control.indices == [0, 2] and label0c.tolist() == label0.tolist() and torch.equal(image0c, items[0][0])


@pytest.mark.slow
def test_mib_dropclass_two_steps_and_offline_through_run_py(cooc, tmp_path, caplog):
    import evaluate
    import run

    args = smoke_args(cooc, tmp_path / "inc", steps=(0, 1), extra=["--method", "MiB", "--dropclass", "--epochs", "2",
                                                                    "--lr", "0.01", "0.001", "--batch_size", "4"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "loss_ce_drop=" in text and "loss_kd=" in text and "froze the importance rows of 16 classes" in text
    state = torch.load(tmp_path / "inc" / "ckpt" / "15-5-voc_Experiment_1.pth", weights_only=True)["model_state"]
    assert state["drop.frozen_rows"].shape == (16, 256) and "drop.conv.weight" in state
    from experiment.checkpoints import load_old_model
    from experiment.config import parse_config
    from methods.stack import build_method

    cfg = parse_config(args)
    teacher = load_old_model(cfg, 1, "cpu", method=build_method(cfg))  # as attribute.py and run.py load it
    assert teacher.drop.readout == "plain" and not teacher.training

    off = smoke_args(cooc, tmp_path / "off", task="offline", extra=["--method", "FT", "--dropclass", "--epochs",
                                                                     "2", "--batch_size", "4"])
    assert run.main(off) == 0
    res = _evaluate(evaluate, [*off, "--erase_class", "1"])
    holding = sum(1 for lab in _labels(cooc, "val") if (lab == 1).any())
    assert res["erased"] == {"class": 1, "images": holding, "erased": True}
    assert res["Class IoU"][1] == "X"  # every class-1 pixel erased and ignored
    same = _evaluate(evaluate, [*off, "--images_with", "1"])
    assert same["erased"] == {"class": 1, "images": holding, "erased": False} and same["Class IoU"][1] == "X"


def _evaluate(evaluate, argv):
    from experiment.config import parse_config
    from methods.stack import build_method

    cfg = parse_config(argv, parser=evaluate.get_parser())
    return evaluate.evaluate_checkpoint(cfg, build_method(cfg))


def test_dropclass_refuses_classifiers_it_cannot_read():
    from experiment.config import parse_config
    from methods.stack import build_method
    from utils.errors import UserError

    with pytest.raises(UserError, match="--dropclass needs conv1x1 classifiers; --method SSUL has conv_head"):
        build_method(parse_config(["--method", "SSUL", "--dropclass", "--backbone", "resnet18"]))


@pytest.mark.slow
def test_cooccurrence_experiment_script_runs(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "dropclass_cooccurrence.py")
    spec = importlib.util.spec_from_file_location("dropclass_cooccurrence", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "x"), "--epochs", "1", "--size", "32", "--train", "60", "--val", "40"]) == 0
    results = json.load(open(tmp_path / "x" / "results.json"))
    assert list(results) == ["FT (E)", "FT (2E)", "FT + DropClass (2E)"]
    assert [r["epochs"] for r in results.values()] == [1, 2, 2]
    pairs = results["FT (E)"]["pairs"]
    assert set(pairs) == {"14|-15", "15|-14", "11|-9", "9|-11"} and all(p["images"] > 0 for p in pairs.values())
    assert "| run | epochs | mIoU |" in capsys.readouterr().out
