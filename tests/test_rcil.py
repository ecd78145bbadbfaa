"""RCIL (methods/rcil.py, modules/rcil.py): the fold of twin branches for every norm type, drop-path, PCKD against
an independent re-computation of docs/rcil.md, the frozen parts across a step, and end-to-end runs (three steps,
RCIL + AWT, a kill and a resume)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, smoke_args
from methods.rcil import PCKD_WEIGHTS, pckd_loss
from utils.loss import collapse_new_classes
from modules import rcil as twins
from modules.norm import NORM_ACT


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            if name.endswith("weight") and p.dim() == 1:
                p.sub_(0.5)  # some negative norm scales: In-Place ABN folds |gamma| + eps
        for m in module.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("norm", ["abn", "iabn", "iabn_sync", "std"])
@pytest.mark.parametrize("channels", [(8, 8, 16), (8, 8)], ids=["bottleneck", "basic"])
def test_fold_equals_the_branch_average(norm, channels):
    block = twins.TwinResidualBlock(8, channels, NORM_ACT[norm], stride=2, dilation=1)
    _randomise(block, 0)
    block.eval()
    conv, bn, twin, twin_bn = block.pairs()[0]
    x = torch.randn(2, 8, 9, 9)
    h = torch.nn.functional.leaky_relu(block.convs.bn1(block.convs.conv1(x)), 0.01) if len(channels) == 3 else x
    average = 0.5 * bn(conv(h)) + 0.5 * twin_bn(twin(h))
    before = block(x)
    assert twins.merge_twins(block) == 1
    block.train()  # a merged main norm stays in evaluation mode
    assert not bn.training and not conv.weight.requires_grad and not bn.weight.requires_grad
    block.eval()
    assert torch.allclose(bn(conv(h)), average, atol=1e-5, rtol=1e-5)
    assert twin.weight.requires_grad  # the twin keeps training
    assert not torch.allclose(block(x), before)  # the twin still counts half: 0.25 old main + 0.75 twin (RCIL)


@pytest.mark.parametrize("norm", ["abn", "iabn", "std"])
def test_a_merged_model_evaluates_like_the_unmerged_one(norm, monkeypatch):
    """Whole model (backbone and ASPP): with the main branches alone, the merged model equals the unmerged one."""
    from segmentation_module import ModelSpec, build_model_from_spec

    spec = ModelSpec(backbone="resnet50", norm_act=norm, head="twin_deeplabv3", pooling=None).with_backbone_options(
        block="twin")
    model = build_model_from_spec(spec, [6, 2])
    _randomise(model, 1)
    model.eval()
    x = torch.randn(1, 3, 48, 48)
    expected, _ = model(x)
    twins.merge_twins(model)
    monkeypatch.setattr(twins, "mix", lambda b1, b2, training: b1)  # the folded main branch only
    merged, _ = model(x)
    assert torch.allclose(merged, expected, atol=1e-4 * float(expected.detach().abs().max()))


def test_drop_path_proportions():
    torch.manual_seed(0)
    first, second = twins.drop_path_weights(30000)
    pairs = torch.stack([first.flatten(), second.flatten()], 1)
    only_first = ((pairs == torch.tensor([1.0, 0.0])).all(1)).float().mean()
    only_second = ((pairs == torch.tensor([0.0, 1.0])).all(1)).float().mean()
    both = ((pairs == torch.tensor([0.5, 0.5])).all(1)).float().mean()
    assert float(only_first + only_second + both) == 1.0
    assert abs(float(only_first) - 0.33) < 0.01 and abs(float(only_second) - 0.33) < 0.01
    assert abs(float(both) - 0.34) < 0.01


# ------------------------------------------------------------------------------------------------ PCKD
def _avg_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Zero-padded (k // 2) stride-1 k x k mean, dividing by k * k (explicit windows)."""
    n, c, h, w = x.shape
    p = k // 2
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p))
    padded[:, :, p:p + h, p:p + w] = x
    oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = padded[:, :, i:i + k, j:j + k].sum(axis=(2, 3)) / (k * k)
    return out


def _channel_pool(x: np.ndarray) -> np.ndarray:
    padded = np.concatenate([np.zeros_like(x[:, :1]), x, np.zeros_like(x[:, :1])], axis=1)
    return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3


def _norm_mean(d: np.ndarray) -> float:
    return float(np.mean([np.sqrt((d[i] ** 2).sum()) for i in range(d.shape[0])]))


def test_pckd_equals_the_spec_formula():
    gen = torch.Generator().manual_seed(2)
    shapes = [(2, 4, 6, 6), (2, 6, 5, 5), (2, 8, 3, 3), (2, 8, 3, 3), (2, 5, 3, 3)]
    old = [torch.randn(s, generator=gen) for s in shapes]
    new = [torch.randn(s, generator=gen) for s in shapes]
    n_old, n_new = 4, 2
    old_logits, new_logits = torch.randn(2, n_old, 3, 3, generator=gen), torch.randn(2, n_old + n_new, 3, 3,
                                                                                       generator=gen)
    weights = PCKD_WEIGHTS["cityscapes_domain"]  # four different weights, one of them 0
    got = pckd_loss(old, new, old_logits, new_logits, n_old=n_old, n_classes=n_old + n_new, n_new=n_new,
                    weights=weights)
    s = math.sqrt((n_old + n_new) / n_new)
    nl = new_logits.numpy()
    collapsed = np.concatenate([nl[:, :1] + nl[:, n_old:].sum(1, keepdims=True), nl[:, 1:n_old]], 1)
    maps = [(a.numpy(), b.numpy()) for a, b in zip(old, new)] + [(old_logits.numpy(), collapsed)]
    spatial = 0.0
    for i, (a, b) in enumerate(maps):
        term = np.mean([_norm_mean(_avg_pool(a ** 2, k) - _avg_pool(b ** 2, k)) for k in (4, 8, 12, 16, 20, 24)])
        spatial += term * s * (weights[1] if i == 5 else weights[0])
    channel = 0.0
    for i, (a, b) in enumerate(maps[:5]):
        channel += _norm_mean(_channel_pool(a ** 2) - _channel_pool(b ** 2)) * s * (weights[3] if i == 4 else
                                                                                      weights[2])
    assert float(got) == pytest.approx(spatial / 6 + channel / 5, rel=1e-5)
    assert torch.equal(collapse_new_classes(new_logits, n_old), torch.from_numpy(collapsed).float())


def test_pckd_receives_the_stage_outputs_after_their_leaky_relu(monkeypatch):
    """RCIL's last block of a stage returns the tensor it has just activated in place (zhangchbin/RCIL
    modules/residual.py L170-171): PCKD distils post-activation maps (slope 0.01), unlike PLOP's POD, which keeps
    the pre-activation ones. Built from RCIL's real blocks; what reaches pckd_loss is checked."""
    import methods.rcil as rcil
    from methods.base import Batch
    from segmentation_module import ModelSpec, build_model_from_spec

    spec = ModelSpec(backbone="resnet18", norm_act="iabn", head="twin_deeplabv3").with_backbone_options(block="twin")
    model = build_model_from_spec(spec, [6, 2])
    _randomise(model, 7)
    model.eval()
    with torch.no_grad():
        logits, extras = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)),
                               ret_intermediate=True)
    seen = {}

    def spy(maps_old, maps_new, *args, **kwargs):
        seen["old"], seen["new"] = maps_old, maps_new
        return torch.zeros(())

    monkeypatch.setattr(rcil, "pckd_loss", spy)
    term = rcil.PCKD(n_old=6, n_classes=8, n_new=2, weights=(1, 1, 1, 1))
    term(Batch(images=None, labels=None, logits=logits, extras=extras, logits_old=logits, extras_old=extras, n_old=6,
               n_new=2, aux={}))
    assert len(seen["new"]) == 5 and seen["new"][-1] is extras["pre_logits"]
    for got, name in zip(seen["new"][:4], ("res2", "res3", "res4", "res5")):
        pre = extras["features"][f"{name}_pre"]
        assert (pre < 0).any()  # the two readings differ here
        assert torch.equal(got, F.leaky_relu(pre, 0.01))  # after the stage's last LeakyReLU
        assert not torch.allclose(got, pre)
    # PLOP's POD reads the stage features, which stay the pre-activation maps
    assert all(torch.equal(a, extras["features"][f"{n}_pre"]) for a, n in
               zip(extras["attentions"][:4], ("res2", "res3", "res4", "res5")))


# ------------------------------------------------------------------------------------------------ model and method
def test_pretrained_3x3_weights_go_to_both_branches(tmp_path):
    from models import BACKBONES
    from models.resnet import build_backbone

    reference = build_backbone("resnet50", NORM_ACT["iabn"])
    _randomise(reference, 3)
    path = tmp_path / "resnet50_iabn.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    family = BACKBONES["resnet50"]
    body = family.build(norm_act="iabn", output_stride=16, bn_momentum=None, block="twin")
    family.load_pretrained(body, str(path))
    block = body.mod3.block2.convs
    assert torch.equal(block.conv2.weight, reference.mod3.block2.convs.conv2.weight)
    assert torch.equal(block.conv2_new.weight, block.conv2.weight)
    assert torch.equal(block.bn2_new.running_var, block.bn2.running_var)
    assert torch.count_nonzero(block.conv2.bias) == 0


def test_rcil_flags_and_init():
    from experiment.config import parse_config
    from methods import build_method
    from utils.errors import UserError

    cfg = parse_config(["--method", "RCIL", "--init_balanced"])  # RCIL's ADE scripts pass it: RCIL's own init
    stack = build_method(cfg)
    assert stack.names == ["RCIL"] and stack.init_plan.method and stack.init_plan.transfer is None
    assert (cfg.loss_kd, cfg.unce, cfg.unkd) == (100, True, True)
    with_awt = build_method(parse_config(["--method", "RCIL", "--att", "25"]))
    assert with_awt.names == ["RCIL", "AWT"] and not with_awt.init_plan.method and with_awt.init_plan.by == "AWT"
    with pytest.raises(UserError, match=r"^--orig_init asks for MiB's initialisation of the new classifier, but "
                                        r"--method RCIL initialises it itself$"):
        parse_config(["--method", "RCIL", "--orig_init"])
    # RCIL's cityscapes_domain scripts: CE and PCKD only (UNCE has no loss when every class is old)
    domain = parse_config(["--method", "RCIL", "--dataset", "cityscapes_domain", "--task", "11-1"])
    assert (domain.loss_kd, domain.unce, domain.unkd) == (0, False, False)


def test_rcil_init_copies_the_background_weights_and_awt_replaces_it():
    from experiment.builders import build_model
    from experiment.config import parse_config
    from methods import build_method
    from methods.base import StepContext
    from modules.heads import final_layer

    cfg = parse_config(["--method", "RCIL", "--task", "15-5", "--step", "1", "--backbone", "resnet18",
                        "--no_pretrained"])
    stack = build_method(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 1, method=stack, pretrained=False)
    bias_before = final_layer(model.cls[-1]).bias.detach().clone()
    stack.init_new_classifier(StepContext(step=1, classes=[16, 5], model=model, method=stack))
    new, bg = final_layer(model.cls[-1]), final_layer(model.cls[0])
    # every new row is the background row; biases untouched (not MiB's -log(N+1))
    assert torch.equal(new.weight, bg.weight[:1].expand_as(new.weight))
    assert torch.equal(new.bias, bias_before)
    # with AWT, AWT's transfer initialises the new classifier and RCIL's copy is not made
    plan = build_method(parse_config(["--method", "RCIL", "--task", "15-5", "--step", "1", "--att", "25"])).init_plan
    assert not plan.method and plan.by == "AWT" and plan.transfer["mask_source"] == "attribution"


def test_pckd_keeps_the_logits_when_a_step_adds_no_class():
    gen = torch.Generator().manual_seed(6)
    maps = [torch.randn(2, 4, 6, 6, generator=gen) for _ in range(2)]
    logits = torch.randn(2, 19, 3, 3, generator=gen)
    moved = logits + 0.5
    # n_old 0, n_new 19 as a domain step's context; no collapse, class ratio 1
    got = pckd_loss([maps[0]], [maps[0]], logits, moved, n_old=0, n_classes=19, n_new=19, weights=(1, 1, 1, 1))
    only_logits = pckd_loss([maps[0]], [maps[0]], logits, moved, n_old=0, n_classes=19, n_new=19,
                            weights=(0, 1, 0, 0))
    assert float(got) == pytest.approx(float(only_logits)) and float(got) > 0


def test_exact_and_captum_agree_on_an_rcil_model():
    from methods import attribution
    from segmentation_module import ModelSpec, build_model_from_spec

    spec = ModelSpec(backbone="resnet18", norm_act="abn", head="twin_deeplabv3").with_backbone_options(block="twin")
    model = build_model_from_spec(spec, [6, 2])
    _randomise(model, 4)
    model.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    exact = attribution.ExactAttributor(model)(images)
    captum = attribution.CaptumAttributor(model, n_steps=20, internal_batch_size=20)(images)
    assert torch.allclose(exact, captum, atol=1e-4 * float(exact.abs().max()))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("rcil") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=80, n_val=24, seed=0)
    return str(root)


@pytest.mark.slow
def test_frozen_parts_are_the_fold_of_the_previous_step(voc, tmp_path):
    import run
    from experiment.builders import build_model
    from experiment.config import parse_config

    args = smoke_args(voc, tmp_path, steps=(0, 1), extra=["--method", "RCIL", "--lr", "0.01", "0.001",
                                                          "--batch_size", "4"])
    assert run.main(args) == 0
    step0 = torch.load(tmp_path / "ckpt" / "15-5-voc_Experiment_0.pth", weights_only=True)["model_state"]
    step1 = torch.load(tmp_path / "ckpt" / "15-5-voc_Experiment_1.pth", weights_only=True)["model_state"]
    from methods.stack import build_method

    cfg = parse_config(args)
    model = build_model(cfg, 0, method=build_method(cfg), pretrained=False)
    model.load_state_dict(step0)
    twins.merge_twins(model)
    folded = model.state_dict()
    main = [k for k in folded if ".conv1." in k and ".convs." in k or "map_convs." in k or ".bn1." in k and
            ".convs." in k or "map_bn." in k]
    assert main
    for key in main:  # the merged convs and their identity norms did not move during step 1
        assert torch.equal(step1[key], folded[key]), key
    assert not torch.equal(step1["body.mod2.block1.convs.conv1_new.weight"],
                           step0["body.mod2.block1.convs.conv1_new.weight"])  # the twin trained
    assert int(step1["head.merged"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("awt", [True], ids=["RCIL+AWT"])  # covers RCIL's own state; plain RCIL: two-step tests
def test_three_steps_survive_a_kill(voc, tmp_path, awt):
    name = "RCIL_AWT" if awt else "RCIL"
    extra = ["--method", "RCIL", "--name", name, "--lr", "0.01", "0.001", "0.001", "--batch_size", "4",
             "--epochs", "3", "--task", "15-1", "--overlap"] + (["--att", "25", "--mask_att"] if awt else [])
    args = smoke_args(voc, tmp_path / "out", steps=(0, 1, 2), extra=extra)
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / "out" / "ckpt" / f"15-1-voc_{name}_2.partial.pth"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "no in-step checkpoint of step 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming step from" in again.stdout and "loss_pckd=" in again.stdout
    rows = (tmp_path / "out" / "results" / f"test_voc_15-1_{name}.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["0", "1", "2"]
    if awt:
        assert list((tmp_path / "out" / "channels").rglob("step2_*.pt"))


def test_the_pod_flags_rcil_scripts_pass_are_accepted_with_one_warning():
    from experiment.config import parse_config

    notes: list[str] = []
    cfg = parse_config(["--method", "RCIL", "--pod", "local", "--pod_logits"], notes=notes)
    assert cfg.pod == "local" and len(notes) == 2
    assert notes[0].startswith("--pod has no effect with --method RCIL: PCKD replaces PLOP's POD")
    assert notes[1].startswith("--pod_logits has no effect with --method RCIL")


@pytest.mark.slow
def test_a_run_warns_about_an_ignored_flag_once(voc, tmp_path, caplog):
    import run

    with caplog.at_level("WARNING"):
        assert run.main(smoke_args(voc, tmp_path, extra=["--method", "RCIL", "--pod", "local"])) == 0
    said = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("--pod has no effect with --method RCIL")
