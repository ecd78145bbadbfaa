"""NeST (methods/nest.py): the CPU checks of the spec (nest.md §10) against explicit computations, the flag rules,
the combinations with AWT, and runs of MiB+NeST and PLOP+NeST killed inside the pre-tuning and resumed to the bytes
of an uninterrupted run."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import smoke_args
from methods import nest
from methods.base import StepContext
from segmentation_module import make_model
from torch.optim.optimizer import register_optimizer_step_pre_hook as register_hook


# ------------------------------------------------------------------------------------------------ the math
class FixedOld(nn.Module):
    """An "old model" whose classifier input is given (the similarity pass reads ``pre_logits`` and ``cls``)."""

    def __init__(self, features, rows, biases):
        super().__init__()
        self.features = features
        conv = nn.Conv2d(rows.shape[1], rows.shape[0], 1)
        conv.weight.data = rows[:, :, None, None].clone()
        conv.bias.data = biases.clone()
        self.cls = nn.ModuleList([conv])

    def forward(self, images):
        return None, {"pre_logits": self.features[: images.shape[0]]}


def test_similarity_init_is_the_mean_of_sign_agreement_times_probability():
    gen = torch.Generator().manual_seed(0)
    k, d = 3, 4
    rows, biases = torch.randn(k, d, generator=gen), torch.randn(k, generator=gen)
    feats = torch.randn(1, d, 2, 3, generator=gen)
    labels = torch.tensor([[[3, 3, 3], [3, 255, 3]]])  # label 3 = the new class (n_old 3): five pixels
    old = FixedOld(feats, rows, biases)
    got = nest.similarity_init(old, [(torch.zeros(1, 3, 2, 3), labels)], n_old=3, n_new=1, device="cpu", size=(2, 3))
    expected = torch.zeros(k, d, dtype=torch.float64)
    n = 0
    for i in range(2):
        for j in range(3):
            if int(labels[0, i, j]) != 3:
                continue
            f = feats[0, :, i, j].double()
            s = torch.softmax(rows.double() @ f + biases.double(), dim=0)
            for r in range(k):
                for c in range(d):
                    expected[r, c] += float(f[c] * rows[r, c] > 0) * s[r]
            n += 1
    assert n == 5
    expected /= n
    importance, mixing = got["importance"][0].double(), got["mixing"][0].double()
    assert torch.allclose(importance, expected, atol=1e-6)
    assert float(importance.min()) >= 0 and float(importance.max()) <= 1
    assert torch.allclose(mixing, torch.softmax(expected.sum(dim=1), dim=0), atol=1e-6)
    assert math.isclose(float(mixing.sum()), 1.0, abs_tol=1e-6)


def test_an_absent_new_class_gets_the_background_row_and_no_nan():
    old = FixedOld(torch.randn(1, 4, 2, 2), torch.randn(3, 4), torch.zeros(3))
    labels = torch.tensor([[[3, 0], [0, 0]]])  # new class 0 present, new class 1 (label 4) absent
    got = nest.similarity_init(old, [(torch.zeros(1, 3, 2, 2), labels)], n_old=3, n_new=2, device="cpu", size=(2, 2))
    assert torch.isfinite(got["importance"]).all() and torch.isfinite(got["mixing"]).all()
    assert torch.equal(got["mixing"][1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(got["importance"][1, 0], torch.ones(4)) and not got["importance"][1, 1:].any()
    assert got["pixels"].tolist() == [1.0, 0.0]


def test_generated_rows_special_cases_are_mib_and_awt():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 6, generator=gen)
    one_hot = torch.tensor([[1.0, 0, 0, 0]])
    ones = torch.ones(1, 4, 6)
    assert torch.equal(nest.generate_rows(one_hot, ones, rows)[0], rows[0])  # MiB's copy of the background
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0])
    importance = ones.clone()
    importance[0, 0] = mask
    assert torch.equal(nest.generate_rows(one_hot, importance, rows)[0], rows[0] * mask)  # AWT's transferred part
    p, m = torch.rand(2, 4, generator=gen), torch.rand(2, 4, 6, generator=gen)
    loop = torch.stack([sum(p[c, j] * m[c, j] * rows[j] for j in range(4)) for c in range(2)])
    assert torch.allclose(nest.generate_rows(p, m, rows), loop, atol=1e-6)


def test_indicator_sums_equal_the_explicit_sign_test():
    gen = torch.Generator().manual_seed(2)
    f, s, w = torch.randn(7, 5, generator=gen), torch.rand(7, 3, generator=gen), torch.randn(3, 5, generator=gen)
    f[0, 1] = 0.0  # a zero feature agrees with no sign
    explicit = ((f[:, None, :] * w[None] > 0).float() * s[:, :, None]).sum(0)
    assert torch.allclose(nest.indicator_sums(f, s, w), explicit, atol=1e-6)


def test_warm_loss_is_unce_averaged_over_every_pixel():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 2, 2, generator=gen)
    labels = torch.tensor([[[0, 3], [4, 255]]])  # n_old 3: label 3 and 4 new, 0 background, one ignored pixel
    got = nest.warm_loss(logits, labels, 3, unbiased=True)
    p = logits.softmax(dim=1)
    explicit = [-(p[0, :3, 0, 0].sum()).log(), -p[0, 3, 0, 1].log(), -p[0, 4, 1, 0].log(), torch.tensor(0.0)]
    assert torch.allclose(got, sum(explicit) / 4, atol=1e-6)  # the ignored pixel counts in the denominator


# ------------------------------------------------------------------------------------------------ the phase
def _step_model(seed=0):
    torch.manual_seed(seed)
    model = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 2], head_channels=16)
    old = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3], head_channels=16)
    old.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cls.1")})
    old.eval()
    return model, old


def _ctx(model, old, batches, tmp_path=None):
    return StepContext(step=1, classes=[3, 2], model=model, model_old=old, train_loader=batches, lr=0.01,
                       checkpoint_path=str(tmp_path / "step1.pth") if tmp_path else None)


def _plugin(argv):
    from experiment.config import parse_config
    from methods.stack import build_method

    cfg = parse_config(["--dataset", "voc", "--task", "15-1", "--method", "MiB", *argv])
    stack = build_method(cfg)
    return next(p for p in stack.plugins if p.name == "NeST"), stack


def _batches(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 5, (2, 32, 32), generator=gen)
        out.append((torch.randn(2, 3, 32, 32, generator=gen), labels))
    return out


@pytest.mark.parametrize("bn", ["update", "frozen"])
def test_one_pretuning_step_changes_only_nest_tensors(bn, tmp_path):
    model, old = _step_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin, _ = _plugin(["--nest", "--warm_epochs", "1", "--nest_bn", bn, "--no_progress"])
    ctx = _ctx(model, old, _batches(1), tmp_path)
    extras = plugin._prepare(ctx)
    trainable = extras + [model.cls[-1].bias]
    generated = {id(p): p.detach().clone() for p in trainable}
    plugin._pretune(ctx, trainable, True)
    assert all(not torch.equal(generated[id(p)], p.detach()) for p in extras[:2])  # M and P learnt
    state = model.state_dict()
    for key, value in before.items():
        if key.startswith(("cls.0.", "cls.1.")):
            continue
        if "running_" in key:
            assert torch.equal(value, state[key]) == (bn == "frozen"), key
        else:
            assert torch.equal(value, state[key]), key  # body, head: bitwise equal
    assert torch.equal(before["cls.0.bias"], state["cls.0.bias"])
    assert torch.equal(before["cls.0.weight"][1:], state["cls.0.parametrizations.weight.original"][1:])
    assert torch.equal(before["cls.0.weight"], state["cls.0.parametrizations.weight.original"])


def test_fold_keeps_the_norms_the_spec_names():
    model, old = _step_model()
    nest.check_plain_classifiers(model)
    gen = torch.Generator().manual_seed(4)
    k, d = 3, 16
    w0_before = model.cls[0].weight[0].detach().clone()
    nest.install(model, torch.rand(2, k, d, generator=gen), torch.rand(2, k, generator=gen).softmax(dim=1))
    bg = model.cls[0].parametrizations.weight[0]
    with torch.no_grad():
        bg.importance.copy_(torch.rand(1, d, generator=gen))
        bg.scale.fill_(0.3)
        model.cls[1].bias.copy_(torch.tensor([0.01, -0.02]))
    generated = model.cls[1].weight.detach().clone()
    factors = nest.fold(model)
    assert not nest.parametrize.is_parametrized(model.cls[0]) and not nest.parametrize.is_parametrized(model.cls[1])
    assert torch.allclose(model.cls[0].weight[0].norm(), w0_before.norm(), rtol=1e-5)  # direction learnt, norm kept
    assert not torch.allclose(model.cls[0].weight[0], w0_before)
    assert torch.allclose(model.cls[1].bias.norm(), model.cls[0].bias.norm(), rtol=1e-5)  # norm of all K old biases
    assert model.cls[1].bias[0] > 0 > model.cls[1].bias[1]  # signs kept
    old_mean = model.cls[0].weight.flatten(1).norm(dim=1).mean()
    assert torch.allclose(model.cls[1].weight.flatten(1).norm(dim=1).mean(), old_mean, rtol=1e-5)
    assert torch.allclose(model.cls[1].weight, generated * factors["align"], rtol=1e-5)


def test_folded_classifiers_answer_as_the_parametrised_ones_up_to_the_rescaling():
    """Spec check 6: on the same features, the plain 1x1 classifiers after the fold give the logits of the
    parametrised ones, up to the factors the fold applies (new rows: align, new biases: bias, background row:
    background)."""
    model, _ = _step_model(seed=1)
    gen = torch.Generator().manual_seed(5)
    nest.install(model, torch.rand(2, 3, 16, generator=gen), torch.rand(2, 3, generator=gen).softmax(dim=1))
    with torch.no_grad():
        model.cls[0].parametrizations.weight[0].importance.copy_(torch.rand(1, 16, generator=gen))
        model.cls[1].bias.copy_(torch.tensor([0.05, -0.03]))
    feats = torch.randn(2, 16, 5, 5, generator=gen)
    with torch.no_grad():
        before_new, before_bg = model.cls[1](feats), model.cls[0](feats)
        bias_new, bias_bg = model.cls[1].bias.clone().view(1, -1, 1, 1), model.cls[0].bias.clone().view(1, -1, 1, 1)
        factors = nest.fold(model)
        after_new, after_bg = model.cls[1](feats), model.cls[0](feats)
    expected_new = factors["align"] * (before_new - bias_new) + factors["bias"] * bias_new
    assert torch.allclose(after_new, expected_new, atol=1e-5)
    expected_bg0 = factors["background"] * (before_bg[:, :1] - bias_bg[:, :1]) + bias_bg[:, :1]
    assert torch.allclose(after_bg[:, :1], expected_bg0, atol=1e-5)
    assert torch.allclose(after_bg[:, 1:], before_bg[:, 1:], atol=1e-6)  # the other old rows are untouched


def test_pretuning_lr_is_poly_over_its_own_iterations(tmp_path):
    model, old = _step_model()
    plugin, _ = _plugin(["--nest", "--warm_epochs", "2", "--warm_lr_scale", "3", "--no_progress"])
    batches = _batches(3)
    ctx = _ctx(model, old, batches, tmp_path)
    trainable = plugin._prepare(ctx) + [model.cls[-1].bias]
    seen = []
    handle = register_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        plugin._pretune(ctx, trainable, True)
    finally:
        handle.remove()
    total = 2 * len(batches)
    expected = [0.01 * 3 * (1 - it / total) ** 0.9 for it in range(total)]
    assert len(seen) == total and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(seen, expected))
    assert os.path.isfile(nest.phase_path(ctx))  # the phase's own in-step checkpoint


def test_after_init_restores_what_was_frozen_and_fix_pre_cls_freezes_old_heads(tmp_path):
    model, old = _step_model()
    frozen = next(model.body.parameters())
    frozen.requires_grad_(False)  # frozen by the host before (e.g. RCIL's folded convs)
    plugin, _ = _plugin(["--nest", "--warm_epochs", "1", "--fix_pre_cls", "--no_progress"])
    plugin.after_init(_ctx(model, old, _batches(1), tmp_path))
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in list(model.body.parameters())[1:])
    assert not any(p.requires_grad for p in model.cls[0].parameters())
    assert all(p.requires_grad for p in model.cls[1].parameters())
    fresh, _ = _step_model()  # same parameters in the same order as a model that never had the phase
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert list(model.state_dict()) == list(fresh.state_dict())


def test_a_resumed_step_skips_the_pretuning(tmp_path, caplog):
    model, old = _step_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin, _ = _plugin(["--nest", "--no_progress"])
    ctx = _ctx(model, old, _batches(1), tmp_path)
    ctx.resume_from = str(tmp_path / "x.partial.pth")
    with caplog.at_level("INFO"):
        plugin.after_init(ctx)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "NeST pre-tuning skipped" in caplog.text


# ------------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("argv, message", [
    (["--method", "SSUL", "--nest"], "needs conv1x1 classifiers"),
    (["--method", "MiB", "--nest", "--att", "25"], "--nest_init awt"),
    (["--method", "MiB", "--nest", "--nest_init", "awt"], "add --att 25"),
    (["--method", "MiB", "--nest", "--dropclass"], "does not compose with DropClass"),
    (["--method", "MiB", "--warm_epochs", "3"], "--warm_epochs belongs to NeST"),
    (["--method", "MiB", "--two_stage", "--nest_bn", "frozen"], "--two_stage"),
    (["--method", "MiB", "--nest", "--warm_lr_scale", "0"], "--warm_lr_scale"),
    (["--method", "MiB", "--nest", "--warm_epochs", "-1"], "--warm_epochs -1"),
    (["--dataset", "cityscapes_domain", "--method", "FT", "--nest"], "cities"),
])
def test_impossible_nest_flags_are_refused_with_one_line(argv, message):
    from experiment.config import parse_config
    from methods.stack import build_method
    from utils.errors import UserError

    base = [] if "--dataset" in argv else ["--dataset", "voc", "--task", "15-1"]
    with pytest.raises(UserError) as info:
        build_method(parse_config([*base, *argv]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_names_and_plans_of_the_combinations():
    from experiment.config import parse_config
    from methods.stack import build_method

    def run(argv):
        cfg = parse_config(["--dataset", "voc", "--task", "15-1", *argv])
        stack = build_method(cfg)
        return cfg.name, stack.init_plan.by

    assert run(["--method", "MiB", "--nest", "--init_balanced"]) == ("MiB+NeST", "NeST")  # as the published script
    assert run(["--method", "PLOP", "--warm_up", "--unce_in_warm", "--fix_pre_cls"]) == ("PLOP+NeST", "NeST")
    assert run(["--method", "RCIL", "--nest"]) == ("RCIL+NeST", "NeST")
    assert run(["--method", "MiB", "--nest", "--nest_init", "awt", "--att", "25", "--mask_att"]) == \
        ("MiB+NeST-AWT", "NeST")
    assert run(["--method", "MiB", "--two_stage", "--att", "25", "--mask_att"]) == ("MiB+AWT+TwoStage", "AWT")
    assert run(["--method", "MiB", "--att", "25", "--mask_att", "--attribution", "similarity"])[1] == "AWT"


def test_similarity_attributor_scores_are_sign_agreement_times_background_probability():
    from methods.attribution import build_attributor

    model, _ = _step_model()
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    got = build_attributor(model, method="similarity")(images)
    with torch.no_grad():
        logits, extras = model(images, ret_intermediate=True)
    z = extras["pre_logits"]
    w0 = model.cls[0].weight[0, :, 0, 0]
    p0 = extras["sem_logits_small"].softmax(dim=1)[:, 0]
    assert torch.allclose(got, (z * w0[None, :, None, None] > 0).float() * p0[:, None], atol=1e-6)


# ------------------------------------------------------------------------------------------------ runs
def _run_args(voc, out, host, extra=()):
    return smoke_args(voc, out, task="15-1", steps=(0, 1, 2),
                      extra=["--method", host, "--nest", "--overlap", "--lr", "0.01", "0.001", "0.001",
                             "--batch_size", "4", "--epochs", "2", "--ckpt_interval", "1", "--warm_epochs", "3",
                             "--crop_size", "48", *extra])


def _final(out, host, step=2):
    return torch.load(os.path.join(str(out), "ckpt", f"15-1-voc_Experiment_{step}.pth"), map_location="cpu",
                      weights_only=True)


def _csv(out):
    with open(os.path.join(str(out), "results", "test_voc_15-1_Experiment.csv")) as handle:
        return handle.read()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("nest") / "PascalVOC12"
    generate(str(root), "voc", size=48, n_train=40, n_val=20, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def uninterrupted(voc, tmp_path_factory):
    import run

    outs = {}
    for host in ("MiB", "PLOP"):
        out = tmp_path_factory.mktemp(f"nest_{host}")
        assert run.main(_run_args(voc, out, host)) == 0
        outs[host] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("host", ["MiB", "PLOP"])
@pytest.mark.parametrize("where", ["pretuning", "host training"])
def test_a_run_killed_in_the_pretuning_resumes_to_the_same_bytes(voc, tmp_path, monkeypatch, uninterrupted, host,
                                                                 where):
    import run

    args = _run_args(voc, tmp_path, host)
    if where == "pretuning":  # Ctrl-C right after the phase checkpoint of epoch 2 (of 3) of step 2
        original = nest.NeST._save

        def save_then_stop(self, ctx, full, epoch, *rest):
            original(self, ctx, full, epoch, *rest)
            if ctx.step == 2 and epoch == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(nest.NeST, "_save", save_then_stop)
        assert run.main(args) == 130
        phase = tmp_path / "ckpt" / "15-1-voc_Experiment_2.pth.nest.partial.pth"
        assert phase.is_file() and torch.load(phase, weights_only=True)["epoch"] == 2
        monkeypatch.setattr(nest.NeST, "_save", original)
    else:  # Ctrl-C in the host's epoch 2 of step 2: the rerun continues from its checkpoint, no pre-tuning again
        original = run.train.train_one_epoch

        def stop_in_step_2(*a, step, epoch, **k):
            if step == 2 and epoch == 1:
                raise KeyboardInterrupt
            return original(*a, step=step, epoch=epoch, **k)

        monkeypatch.setattr(run.train, "train_one_epoch", stop_in_step_2)
        assert run.main(args) == 130
        monkeypatch.setattr(run.train, "train_one_epoch", original)
    phases = []
    real = nest.NeST._pretune
    monkeypatch.setattr(nest.NeST, "_pretune", lambda self, *a: (phases.append(1), real(self, *a))[1])
    assert run.main(args) == 0
    assert phases == ([1] if where == "pretuning" else [])
    assert not (tmp_path / "ckpt" / "15-1-voc_Experiment_2.pth.nest.partial.pth").exists()
    a, b = _final(tmp_path, host), _final(uninterrupted[host], host)
    assert set(a["model_state"]) == set(b["model_state"])
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    assert _csv(tmp_path) == _csv(uninterrupted[host])


@pytest.mark.slow
def test_sigkill_inside_the_pretuning_then_rerun_gives_the_uninterrupted_bytes(voc, tmp_path):
    """A real kill (SIGKILL of the process group) once the phase's first in-step checkpoint of step 1 exists."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    def cmd(out):
        args = smoke_args(voc, out, task="15-1", steps=(0, 1),
                          extra=["--method", "MiB", "--nest", "--overlap", "--lr", "0.01", "0.001", "--batch_size", "4",
                                 "--epochs", "1", "--warm_epochs", "40", "--crop_size", "48"])
        return [sys.executable, os.path.join(ROOT, "run.py"), *args]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(cmd(full), cwd=tmp_path, env=env, capture_output=True, timeout=600).returncode == 0
    phase = killed / "ckpt" / "15-1-voc_Experiment_1.pth.nest.partial.pth"
    proc = subprocess.Popen(cmd(killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not phase.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and phase.exists(), "the pre-tuning ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "ckpt" / "15-1-voc_Experiment_1.pth").exists()
    rerun = subprocess.run(cmd(killed), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming NeST's pre-tuning from" in rerun.stdout + rerun.stderr
    a = torch.load(killed / "ckpt" / "15-1-voc_Experiment_1.pth", weights_only=True)["model_state"]
    b = torch.load(full / "ckpt" / "15-1-voc_Experiment_1.pth", weights_only=True)["model_state"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rcil_hosts_nest_instead_of_its_own_initialisation(voc, tmp_path, caplog):
    import run

    args = smoke_args(voc, tmp_path, task="15-1", steps=(0, 1),
                      extra=["--method", "RCIL", "--nest", "--overlap", "--lr", "0.01", "0.001", "--batch_size", "4",
                             "--warm_epochs", "1", "--crop_size", "48", "--name", "RCIL_NeST"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    assert "NeST folded into the new classifier" in caplog.text
    assert "loss_pckd=" in caplog.text  # RCIL's own losses train after the phase
