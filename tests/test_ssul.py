"""SSUL and SSUL-M (methods/ssul.py, methods/memory.py): the relabelling, pseudo-labels, BCE, memory selection and
prediction against independent re-computations of docs/ssul.md on small tensors; the model family, the weight
transfer and the freezing; saliency maps; end-to-end runs (SSUL, SSUL-M, SSUL+AWT, a kill and a resume)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, smoke_args
from methods.memory import select_balanced
from methods.ssul import bce_with_ignore, merge_unknown, pseudo_label, unknown_relabel
from test_errors import _assert_one_line, _run

IGN = 255


# ------------------------------------------------------------------------------------------------ labels and loss
def test_unknown_relabel_pixel_by_pixel():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (2, 5, 7), generator=gen)
    labels[0, 0, :3] = IGN
    saliency = torch.randint(0, 3, (2, 5, 7), generator=gen) * 60
    out = unknown_relabel(labels, saliency)
    for b, i, j in np.ndindex(*labels.shape):
        y, s = int(labels[b, i, j]), int(saliency[b, i, j])
        expected = IGN if y == IGN else (0 if (y == 0 and s > 0) else y + 1)
        assert int(out[b, i, j]) == expected
    no_maps = unknown_relabel(labels, None)  # ADE20K / Cityscapes: every background pixel is unknown
    assert torch.equal(no_maps, torch.where(labels == 0, 0, torch.where(labels == IGN, IGN, labels + 1)))


def test_pseudo_labels_take_confident_old_classes_on_background_and_unknown_only():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, 4, generator=gen) * 3
    labels = torch.randint(0, 7, (2, 4, 4), generator=gen)
    labels[0, 0, 0] = IGN
    out = pseudo_label(labels, logits, 0.7)
    probs = 1 / (1 + np.exp(-logits.numpy()))
    for b, i, j in np.ndindex(*labels.shape):
        y = int(labels[b, i, j])
        p = probs[b, :, i, j]
        k = int(p.argmax())
        expected = k if (y <= 1 and k > 1 and p[k] >= 0.7) else y
        assert int(out[b, i, j]) == expected


def test_bce_is_summed_over_channels_and_averaged_over_labelled_pixels():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 3, generator=gen)
    labels = torch.randint(0, 4, (2, 3, 3), generator=gen)
    labels[1, 2] = IGN
    z, total, count = logits.double().numpy(), 0.0, 0
    for b, i, j in np.ndindex(*labels.shape):
        y = int(labels[b, i, j])
        if y == IGN:
            continue
        count += 1
        for c in range(4):
            t = 1.0 if c == y else 0.0
            x = z[b, c, i, j]
            total += max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
    assert float(bce_with_ignore(logits, labels)) == pytest.approx(total / count, rel=1e-5)


def test_prediction_adds_unknown_to_background_and_drops_it():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]]).view(1, 4, 1, 1)
    p = torch.sigmoid(logits.view(-1))
    scores = merge_unknown(logits).view(-1)
    assert torch.allclose(scores, torch.stack([p[1] + p[0], p[2], p[3]]))


# ------------------------------------------------------------------------------------------------ memory
def _reference_selection(candidates, classes, size, seed):
    """docs/ssul.md 6.2 step 4 written out again: shuffled pool and classes, round-robin first hit."""
    rng = np.random.default_rng(seed)
    pool = [candidates[i] for i in rng.permutation(len(candidates))]
    order = [classes[i] for i in rng.permutation(len(classes))]
    out = []
    while len(out) < size:
        progress = False
        for c in order:
            for k, cand in enumerate(pool):
                if c in cand[3]:
                    out.append(pool.pop(k))
                    progress = True
                    break
            if len(out) >= size:
                break
        if not progress:
            break
    return out


def test_memory_selection_is_class_balanced_deterministic_and_finite():
    rng = np.random.default_rng(3)
    candidates = [[f"img{i}", 0, 0, sorted(set(rng.integers(1, 8, size=rng.integers(1, 3)).tolist()))]
                  for i in range(60)]
    classes = list(range(1, 8))
    chosen = select_balanced(candidates, classes, 21, np.random.default_rng(5))
    assert chosen == _reference_selection(candidates, classes, 21, 5)
    assert chosen == select_balanced(candidates, classes, 21, np.random.default_rng(5))  # same seed, same memory
    assert chosen != select_balanced(candidates, classes, 21, np.random.default_rng(6))
    assert len(chosen) == 21 and len({c[0] for c in chosen}) == 21
    # every class picked in turn: 21 = 3 rounds of the 7 classes, each round gives every class one image
    per_round = [chosen[k:k + 7] for k in range(0, 21, 7)]
    for round_ in per_round:
        assert len(round_) == 7
    # upstream loops forever when no candidate shows a class any more: here it stops
    few = [["a", 0, 0, [1]], ["b", 0, 0, [2]], ["c", 0, 0, []]]
    assert len(select_balanced(few, [1, 2, 3], 10, np.random.default_rng(0))) == 2


# ------------------------------------------------------------------------------------------------ model and transfer
def _cfg(extra=()):
    from experiment.config import parse_config

    return parse_config(["--dataset", "voc", "--task", "15-1", "--backbone", "resnet18", "--no_pretrained",
                         "--method", "SSUL", *extra])


def test_model_family_heads_and_momentum():
    from experiment.builders import build_model
    from methods import build_method

    cfg = _cfg()
    model = build_model(cfg, 2, method=build_method(cfg), pretrained=False)
    assert model.classes == [16, 1, 1] and model.heads == [1, 1, 15, 1, 1]
    assert type(model.body).__name__ == "TorchvisionResNet" and type(model.head).__name__ == "ASPP"
    assert all(len(c) == 4 for c in model.cls)  # 3x3 conv, BN, ReLU, 1x1
    assert model.body.bn1.momentum == 0.01 and model.cls[0][1].momentum == 0.1
    logits, _ = model.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 19, 32, 32)  # unknown + 18 classes


def _step_models(extra=()):
    from experiment.builders import build_model
    from experiment.checkpoints import load_previous_into
    from methods import StepContext, build_method

    cfg = _cfg(extra)
    method = build_method(cfg)
    old = build_model(cfg, 0, pretrained=False, method=method)
    torch.manual_seed(0)
    for p in old.parameters():  # distinct values everywhere, at the scale of a trained network
        p.data.add_(torch.randn_like(p) * 0.05)
    for m in old.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    new = build_model(cfg, 1, pretrained=False, method=method)
    load_previous_into(new, old, 1)
    ctx = StepContext(step=1, classes=[16, 1], model=new, model_old=old, method=method)
    return cfg, method, old, new, ctx


def test_weight_transfer_copies_the_unknown_head():
    _, method, old, new, ctx = _step_models()
    before = {k: v.clone() for k, v in new.cls[-1].state_dict().items()}
    assert method.method.init_new_classifier(ctx)
    unk, head = old.cls[0], new.cls[-1]
    for k in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(head.state_dict()[k], unk.state_dict()[k]), k
    assert torch.equal(head[3].weight, unk[3].weight.expand_as(head[3].weight))
    assert torch.equal(head[3].bias, unk[3].bias.expand_as(head[3].bias))
    assert not torch.equal(before["3.weight"], head[3].weight)


def test_awt_replace_variant_keeps_the_random_1x1_and_adds_the_masked_unknown_weights():
    from methods.transfer import init_new_classifier

    _, method, old, new, ctx = _step_models(["--att", "25", "--mask_att"])
    random_w = new.cls[-1][3].weight.clone()
    method.method.init_new_classifier(ctx)
    assert torch.equal(new.cls[-1][3].weight, random_w)  # replace: SSUL leaves the 1x1 weights to AWT
    assert torch.equal(new.cls[-1][3].bias, old.cls[0][3].bias.expand(1))
    mask = torch.zeros(256, dtype=torch.bool)
    mask[:64] = True
    source = method.transfer_source(new)
    init_new_classifier(new, channel_mask=mask, source=(source.layer, source.row))
    w_unk = old.cls[0][3].weight[0]
    assert torch.allclose(new.cls[-1][3].weight[0], random_w[0] + w_unk * mask[:, None, None].float())
    _, method_b, old_b, new_b, ctx_b = _step_models(["--att", "25", "--mask_att", "--ssul_awt_variant", "add"])
    method_b.method.init_new_classifier(ctx_b)
    assert torch.equal(new_b.cls[-1][3].weight, old_b.cls[0][3].weight)


def test_step_one_trains_only_the_three_heads_with_their_lrs():
    cfg, method, old, new, ctx = _step_models()
    groups = method.param_groups(new, 0.01, 1)
    assert [g["lr"] for g in groups] == [0.01, 0.01, 0.01 * 1e-4]
    trained = {id(p) for g in groups for p in g["params"]}
    names = [[n for n, p in new.named_parameters() if any(p is q for q in g["params"])] for g in groups]
    assert names == [[f"cls.{h}.0.weight", f"cls.{h}.3.weight", f"cls.{h}.3.bias"] for h in (3, 0, 1)]
    assert all(not p.requires_grad for n, p in new.named_parameters() if id(p) not in trained)
    new.train()
    assert all(not m.training for m in new.modules() if isinstance(m, torch.nn.BatchNorm2d))  # BN frozen
    step0 = method.param_groups(old, 0.01, 0)
    assert [g["lr"] for g in step0] == [0.001, 0.01]  # SSUL's hard-coded 0.001 / 0.01


def test_exact_and_captum_attribute_the_unknown_logit_alike():
    from methods import attribution

    _, method, old, _new, _ = _step_models()
    old.eval()
    source = method.transfer_source(old)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    exact = attribution.ExactAttributor(old, source=source)(images)
    captum = attribution.CaptumAttributor(old, n_steps=20, internal_batch_size=20, source=source)(images)
    assert exact.shape == (2, 256, 2, 2)
    assert torch.allclose(exact, captum, atol=1e-4 * float(exact.abs().max()))


def test_scheduler_floor_and_warm_poly():
    from utils.optim import build_scheduler

    def lrs(flags, lr, total, n):
        """The lr of the first n iterations and the one after them."""
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched, seen = build_scheduler(opt, _cfg(flags), total), []
        for _ in range(n):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen, opt.param_groups[0]["lr"]

    poly, after = lrs(["--lr_policy", "poly", "--lr_power", "0.9"], 0.01, 10, 10)
    assert poly[3] == pytest.approx(0.01 * (1 - 3 / 10) ** 0.9)
    assert after == pytest.approx(1e-6)  # SSUL's floor (the preset's --lr_min 1e-6)
    seen, _ = lrs(["--lr_policy", "warm_poly"], 0.05, 100, 12)
    assert seen[0] == pytest.approx(0.05 * 0.001)
    assert seen[5] == pytest.approx(0.05 * (0.001 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert seen[11] == pytest.approx(0.05 * (1 - 11 / 100) ** 0.9)


def test_other_methods_flags_are_refused_with_ssul():
    from experiment.config import parse_config
    from utils.errors import UserError

    refused = {("--loss_kd", "10"): "--loss_kd belongs to the kd loss term, which --method SSUL does not use",
               ("--pseudo", "entropy"): "--pseudo belongs to the pseudo loss term, which --method SSUL does not use",
               ("--fix_bn",): "--fix_bn acts on the default parameter groups, which --method SSUL replaces",
               ("--orig_init",): "--orig_init asks for MiB's initialisation of the new classifier, but --method SSUL "
                                 "initialises it itself",
               ("--pckd_weights", "1", "1", "1", "1", "1", "1"): r"--pckd_weights belongs to --method RCIL \(this "
                                                                 r"run: --method SSUL\)"}
    for flags, message in refused.items():
        with pytest.raises(UserError, match="^" + message):
            parse_config(["--method", "SSUL", *flags])


def test_awt_options_of_ssul_act_only_with_awt():
    """--ssul_awt_logit background used to switch SSUL's own transfer to the background head without AWT; the AWT
    options are refused unless AWT transfers (and then the source head is the chosen one)."""
    from experiment.config import parse_config
    from methods import build_method
    from utils.errors import UserError

    for flags in (["--ssul_awt_logit", "background"], ["--ssul_awt_variant", "add"]):
        with pytest.raises(UserError, match=f"^{flags[0]} acts on AWT's transfer into the new classifier, which this "
                                            "run does not make"):
            parse_config(["--method", "SSUL", *flags])
    stack = build_method(parse_config(["--method", "SSUL", "--ssul_awt_logit", "background", "--att", "25",
                                       "--mask_att"]))
    assert stack.names == ["SSUL", "AWT"] and stack.method.source_head == 1  # the background head
    assert build_method(parse_config(["--method", "SSUL"])).method.source_head == 0  # unknown


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("ssul") / "PascalVOC12"
    generate(str(root), "voc", size=48, n_train=100, n_val=30, seed=0)
    return str(root)


def test_synthetic_saliency_maps_are_imperfect_object_masks(voc):
    from PIL import Image

    agree, covered = [], []
    for name in sorted(os.listdir(os.path.join(voc, "saliency_map")))[:60]:
        sal = np.array(Image.open(os.path.join(voc, "saliency_map", name)))
        lbl = np.array(Image.open(os.path.join(voc, "SegmentationClassAug", name)))
        valid = lbl != IGN
        agree.append(((sal > 0) == (lbl > 0))[valid].mean())
        covered.append((sal[lbl == 0] > 0).mean() if (lbl == 0).any() else 0)
    assert 0.9 < np.mean(agree) < 1.0  # mostly the objects, not exactly
    assert max(covered) > 0  # some background is salient somewhere


def test_saliency_maps_are_transformed_with_the_label(voc):
    from dataset.incremental import build_datasets

    train = build_datasets(dataset="voc", root=voc, task="15-5", step=0, overlap=True, crop_size=32,
                           cache_root=os.path.join(os.path.dirname(voc), "cache"))[0].with_aux(("saliency",))
    image, label, aux = train[0]
    assert image.shape == (3, 32, 32) and label.shape == aux["saliency"].shape == (32, 32)
    objects = (label > 0) & (label != IGN)
    assert ((aux["saliency"] > 0) == objects)[label != IGN].float().mean() > 0.8  # aligned after crop and flip


def test_missing_saliency_maps_are_one_line(voc, tmp_path, capsys):
    import shutil

    root = tmp_path / "PascalVOC12"
    shutil.copytree(voc, root)
    os.remove(root / "saliency_map" / "synt_000003.png")
    rc, err = _run(smoke_args(str(root), tmp_path / "out", extra=["--method", "SSUL", "--lr", "0.01"]), capsys)
    line = _assert_one_line(rc, err, "saliency map", "synt_000003.png", "does not exist",
                            "clovaai/SSUL/releases")
    assert "Traceback" not in line


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_ssul_and_ssul_m_two_steps_and_the_frozen_parts(voc, tmp_path):
    import run

    out = tmp_path / "out"
    args = smoke_args(voc, out, task="15-1", steps=(0, 1), extra=["--method", "SSUL", "--name", "SSUL", "--lr",
                                                                  "0.01", "--overlap", "--batch_size", "4"])
    assert run.main(args) == 0
    a = torch.load(out / "ckpt" / "15-1-voc_SSUL_0.pth", weights_only=True)["model_state"]
    b = torch.load(out / "ckpt" / "15-1-voc_SSUL_1.pth", weights_only=True)["model_state"]
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("cls.0.", "cls.1.")) for k in changed)  # backbone, ASPP, old heads frozen
    heads_bn = {f"cls.{h}.1.{n}" for h in (0, 1) for n in ("weight", "bias", "running_mean", "running_var")}
    assert not changed & heads_bn  # even the BN layers of the trained heads stay frozen
    assert {k.split(".")[1] for k in b if k.startswith("cls.")} == {"0", "1", "2", "3"}
    rows = (out / "results" / "test_voc_15-1_SSUL.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["0", "1"]
    mem = smoke_args(voc, out, task="15-1", steps=(1, 2), extra=[
        "--method", "SSUL-M", "--name", "SSUL-M", "--lr", "0.01", "--overlap", "--batch_size", "4", "--mem_size", "8",
        "--step_ckpt", str(out / "ckpt" / "15-1-voc_SSUL_0.pth")])
    assert run.main(mem) == 0
    memory = json.loads((out / "ckpt" / "15-1-voc_SSUL-M_memory.json").read_text())
    assert sorted(memory) == ["step_1", "step_2"]
    assert len(memory["step_1"]["memory_list"]) == 8
    assert all(os.path.isfile(os.path.join(voc, img)) for img in memory["step_2"]["memory_list"])


@pytest.mark.slow
def test_ssul_m_awt_three_steps_survive_a_kill(voc, tmp_path):
    out = tmp_path / "out"
    args = smoke_args(voc, out, task="15-1", steps=(0, 1, 2), extra=[
        "--method", "SSUL-M", "--att", "25", "--mask_att", "--name", "SSUL-M_AWT", "--lr", "0.01", "--overlap",
        "--batch_size", "4", "--mem_size", "8", "--epochs", "3"])
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "ckpt" / "15-1-voc_SSUL-M_AWT_2.partial.pth"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert partial.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no partial"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming step from" in again.stdout
    rows = (out / "results" / "test_voc_15-1_SSUL-M_AWT.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["0", "1", "2"]
    assert list((out / "channels").rglob("step2_*.pt"))  # AWT's mask of the unknown logit
    assert not partial.exists()
