"""DKD, DKD-M, STAR and STAR-M: every loss term against an explicit computation (docs/dkd.md and docs/star.md,
section 10 of each spec), the model, optimiser and inference rules, and three steps of synthetic VOC 15-1 killed in
step 2 and resumed to the bytes of an uninterrupted run."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_at_epoch, smoke_args
from utils import loss as L


def _bce(x: float, y: float, pos: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(pos * y * math.log(p) + (1 - y) * math.log(1 - p))


# ------------------------------------------------------------------------------------------------ DKD losses
@pytest.mark.parametrize("negative", [True, False], ids=["255-negative", "255-ignored"])
def test_mbce_matches_the_formula_with_ignore_and_pos_weight(negative):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen)
    labels[labels == 2] = 7  # class ids 5 and 7 on channels 0 and 1
    labels[0, 0, :2] = 255
    labels[1, 3, 3] = 5
    ids = [5, 7]
    got = L.multilabel_bce(logits, labels, ids, pos_weight=2.0, ignore_as_negative=negative)
    total = 0.0
    for c, cid in enumerate(ids):
        values = []
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    lab = int(labels[b, i, j])
                    if lab == 255 and not negative:
                        continue
                    values.append(_bce(float(logits[b, c, i, j]), float(lab == cid), 2.0))
        total += sum(values) / len(values)
    assert got.item() == pytest.approx(total, rel=1e-10)
    # the two modes differ exactly by the ignored pixels' negative terms
    other = L.multilabel_bce(logits, labels, ids, pos_weight=2.0, ignore_as_negative=not negative)
    assert other.item() != pytest.approx(got.item())


def test_kd_is_soft_bce_its_gradient_is_the_sigmoid_difference_and_its_minimum_the_entropy():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z_old = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
    loss = L.sigmoid_distillation(z, z_old)
    p, q = torch.sigmoid(z_old), torch.sigmoid(z)
    explicit = (-(p * torch.log(q) + (1 - p) * torch.log(1 - q))).mean(dim=(0, 2, 3)).sum()
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-12)
    loss.backward()
    n = 2 * 3 * 3  # mean over images and positions of each channel
    assert torch.allclose(z.grad * n, (q - p).detach(), atol=1e-12)
    at_target = L.sigmoid_distillation(z_old, z_old)
    entropy = (-(p * torch.log(p) + (1 - p) * torch.log(1 - p))).mean(dim=(0, 2, 3)).sum()
    assert at_target.item() == pytest.approx(entropy.item(), rel=1e-12) and at_target < loss


def test_decomposition_sums_to_the_logit_on_relu_features_and_the_two_splits_differ_on_leaky_ones():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    f = torch.rand(2, 5, 3, 3, generator=gen, dtype=torch.float64)  # >= 0, as after a ReLU
    full = F.conv2d(f, weight[:, :, None, None])
    for split in L.DKD_SPLITS:
        pos, neg = L.decomposed_logits(f, weight, split)
        assert torch.allclose(pos + neg, full) and (pos >= 0).all() and (neg <= 0).all()
    leaky = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
    by_weight = L.decomposed_logits(leaky, weight, "weight")
    by_product = L.decomposed_logits(leaky, weight, "product")
    prod = leaky[:, None] * weight[None, :, :, None, None]  # (B, C, D, h, w)
    assert torch.allclose(by_product[0], prod.clamp(min=0).sum(2)) and torch.allclose(by_product[1], prod.clamp(max=0).sum(2))
    assert torch.allclose(by_weight[0], (leaky[:, None] * weight.clamp(min=0)[None, :, :, None, None]).sum(2))
    assert not torch.allclose(by_weight[0], by_product[0])
    assert torch.allclose(by_weight[0] + by_weight[1], by_product[0] + by_product[1])


def test_never_loss_is_the_mean_softplus():
    z = torch.tensor([[[[-3.0, 0.0], [2.0, 5.0]]]], dtype=torch.float64)
    expect = sum(-math.log(1 - 1 / (1 + math.exp(-v))) for v in (-3.0, 0.0, 2.0, 5.0)) / 4
    assert L.never_loss(z).item() == pytest.approx(expect, rel=1e-12)


# ------------------------------------------------------------------------------------------------ model helpers
def _cfg(method, *extra, dataset="voc"):
    from experiment.config import parse_config

    return parse_config(["--dataset", dataset, "--task", "15-1", "--backbone", "resnet18", "--norm_act", "abn",
                         "--no_pretrained", "--method", method, *extra])


def _models(method, step=1, *extra):
    """The step's model (old weights copied in) and the old model, random weights, for ``method``."""
    from experiment.builders import build_model
    from methods.stack import build_method

    cfg = _cfg(method, *extra)
    stack = build_method(cfg)
    torch.manual_seed(0)
    old = build_model(cfg, step - 1, method=stack, pretrained=False).eval()
    new = build_model(cfg, step, method=stack, pretrained=False)
    state = old.state_dict()
    new.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return cfg, stack, new, old


def _ctx(stack, model, old, step=1):
    from methods.base import StepContext

    return StepContext(step=step, classes=[16] + [1] * step, model=model, model_old=old, method=stack)


def test_the_layout_puts_the_auxiliary_classifier_on_channel_0_and_class_k_on_channel_k():
    _cfg_, stack, model, _old = _models("DKD", 2)
    assert [final.out_channels for final in model.cls] == [1, 15, 1, 1]
    assert sum(model.classes) == 18 == model.eval()(torch.zeros(1, 3, 32, 32))[0].shape[1]


def test_with_only_the_auxiliary_loss_nothing_but_the_auxiliary_classifier_gets_a_gradient():
    from methods.base import Batch
    from methods.dkd import DKDLoss

    _cfg_, _stack, model, _old = _models("DKD", 1)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    logits, extras = model(x)
    term = DKDLoss(model=model, model_old=None, n_old=16, class_ids=[16], pos_weight=1.0,
                   weights={"mbce": 0, "kd": 0, "dkd_pos": 0, "dkd_neg": 0, "ac": 1.0}, split="weight",
                   ignore_as_negative=True)
    batch = Batch(images=x, labels=torch.zeros(2, 32, 32, dtype=torch.long), logits=logits, extras=extras,
                  logits_old=None, extras_old=None, n_old=16, n_new=1)
    sum(term(batch).values()).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"cls.0.weight", "cls.0.bias"}


def test_new_rows_start_as_the_auxiliary_classifier_and_answer_like_it():
    _cfg_, stack, model, old = _models("DKD", 1)
    stack.init_new_classifier(_ctx(stack, model, old))
    aux, new = model.cls[0], model.cls[-1]
    assert torch.equal(new.weight[0], aux.weight[0]) and torch.equal(new.bias, aux.bias)
    logits = model.eval()(torch.randn(1, 3, 32, 32))[0]
    assert torch.allclose(logits[:, -1], logits[:, 0])


def test_inference_is_background_where_no_class_passes_one_half_and_never_the_auxiliary_channel():
    from methods.dkd import sigmoid_scores

    logits = torch.tensor([[9.0, -1.0, -2.0], [9.0, 0.3, 2.0], [9.0, 1.0, 0.2], [-9.0, 0.0, -0.1]])
    logits = logits.T.reshape(1, 3, 1, 4)  # 4 pixels, channels aux, class 1, class 2
    assert sigmoid_scores(logits).argmax(1).flatten().tolist() == [0, 2, 1, 0]


@pytest.mark.parametrize("method,new_lr,decay_old", [("DKD", 10, 0.0), ("STAR", 100, 1e-4)])
def test_optimiser_groups_and_frozen_batchnorm_after_step_0(method, new_lr, decay_old):
    cfg, stack, model, _old = _models(method, 1)
    groups = stack.param_groups(model, 0.01, 1)
    norm = {id(p) for m in model.norm_layers() for p in m.parameters()}
    assert all(id(p) not in norm for g in groups for p in g["params"])
    where = {}
    for g in groups:
        for p in g["params"]:
            where[id(p)] = (round(g["lr"] / 0.01, 6), g["weight_decay"])
    assert {where[id(p)] for p in model.body.parameters() if p.requires_grad} == {(1, decay_old)}
    assert {where[id(p)] for p in model.head.parameters() if p.requires_grad} == {(10, decay_old)}
    assert {where[id(p)] for c in model.cls[:-1] for p in c.parameters()} == {(10, decay_old)}
    assert {where[id(p)] for p in model.cls[-1].parameters()} == {(new_lr, 1e-4)}
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    model(torch.randn(2, 3, 32, 32))[0].sum().backward()
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())  # statistics frozen


def test_step_0_trains_batchnorm_and_decays_everything():
    _cfg_, stack, model, _old = _models("DKD", 1)
    from experiment.builders import build_model

    model0 = build_model(_cfg("DKD"), 0, method=stack, pretrained=False)
    groups = stack.param_groups(model0, 0.01, 0)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model0.parameters())


def test_warm_poly_of_dkd_on_ade20k_warms_up_over_a_fifth():
    from utils.optim import build_scheduler

    cfg = _cfg("DKD", dataset="ade")
    assert cfg.lr_policy == "warm_poly" and cfg.warmup_fraction == 0.2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[20] == pytest.approx(0.8 ** 0.9)
    assert lrs[50] == pytest.approx(0.5 ** 0.9)


def test_pos_weight_defaults_follow_the_published_scripts():
    from methods.stack import build_method

    dkd, star = build_method(_cfg("DKD")).method, build_method(_cfg("STAR")).method
    assert (dkd.pos_weight(0), dkd.pos_weight(1)) == (2.0, 1.0) and star.pos_weight(3) == 4.0
    assert build_method(_cfg("DKD", dataset="ade")).method.pos_weight(1) == 35.0
    assert build_method(_cfg("STAR", "--pos_weight", "3")).method.pos_weight(0) == 3.0


def test_dkd_totals_are_the_weighted_terms_and_stars_refuses_dkds_weights():
    from methods.base import Batch
    from methods.dkd import DKDLoss
    from utils.errors import UserError

    _cfg_, _stack, model, old = _models("DKD", 1)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 17, (2, 32, 32))
    labels[labels == 16] = 255
    with torch.no_grad():
        logits_old, extras_old = old(x)
    logits, extras = model.train()(x)
    weights = {"mbce": 1.0, "kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 1.0}
    term = DKDLoss(model=model, model_old=old, n_old=16, class_ids=[16], pos_weight=1.0, weights=weights,
                   split="weight", ignore_as_negative=True)
    got = term(Batch(images=x, labels=labels, logits=logits, extras=extras, logits_old=logits_old,
                     extras_old=extras_old, n_old=16, n_new=1))
    f, f_old = extras["pre_logits"], extras_old["pre_logits"]
    pos, neg = L.decomposed_logits(f, model.classifier_rows()[1:16])
    pos_o, neg_o = L.decomposed_logits(f_old, old.classifier_rows()[1:16])
    aux = F.interpolate(F.conv2d(f, model.cls[0].weight, model.cls[0].bias), size=(32, 32), mode="bilinear",
                        align_corners=False)
    expect = {"loss_mbce": L.multilabel_bce(logits[:, 16:17], labels, [16]),
              "loss_kd": 5 * L.sigmoid_distillation(logits[:, 1:16], logits_old[:, 1:16]),
              "loss_dkd_pos": 5 * L.sigmoid_distillation(pos, pos_o),
              "loss_dkd_neg": 5 * L.sigmoid_distillation(neg, neg_o), "loss_ac": L.never_loss(aux)}
    assert set(got) == set(expect)
    for k in expect:
        assert got[k].item() == pytest.approx(expect[k].item(), rel=1e-5), k
    with pytest.raises(UserError, match="--kd is DKD's"):
        from methods.stack import build_method
        build_method(_cfg("STAR", "--kd", "3"))


# ------------------------------------------------------------------------------------------------ STAR parts
def test_class_statistics_match_the_definitions():
    from methods.star import ClassStatistics

    gen = torch.Generator().manual_seed(3)
    f = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    cls = torch.randint(0, 2, (40,), generator=gen)
    stats = ClassStatistics(3, 6, "cpu")  # class 2 has no position
    stats.add(f, cls)
    protos = stats.prototypes()
    for c in range(2):
        fc = f[cls == c]
        unit = fc / fc.norm(dim=1, keepdim=True)
        p = unit.sum(0) / unit.sum(0).norm()
        assert torch.allclose(protos[c], p) and protos[c].norm().item() == pytest.approx(1.0)
        norms = fc.norm(dim=1)
        assert torch.allclose(stats.norm_mean_and_std()[:, c], torch.stack([norms.mean(), norms.std()]))
        assert torch.allclose(stats.noise(protos)[c], ((unit - p) ** 2).mean(0).sqrt())
        other = protos[1 - c]  # the reference's noise, around another class's prototype
        assert torch.allclose(stats.noise(torch.stack([other, other, other]))[c], ((unit - other) ** 2).mean(0).sqrt())
    assert protos[2].abs().sum() == 0 and stats.noise(protos)[2].abs().sum() == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_replay_counts_by_hand(overlap):
    from methods.star import replay_counts

    k, rho, saved = replay_counts([1000.0, 300.0, 50.0], q0=400.0, q=[100.0, 80.0], iterations=10, overlap=overlap,
                                  n_new_classes=2)
    if overlap:
        bg = 1000 * (1 - 0.02)
        assert k == [20, 0] and rho == pytest.approx(bg / 400 - 0.5) and saved == pytest.approx([200 + bg, 300, 50])
    else:
        assert k == [30, 5] and rho == pytest.approx(2.5) and saved == pytest.approx([1400, 400, 130])
    assert replay_counts([10.0, 5.0], q0=0.0, q=[0.0], iterations=1, overlap=True, n_new_classes=1)[1] == 0.0


def test_star_mbce_combines_the_three_sources_and_reduces_to_mbce_without_replay():
    from methods.star import star_mbce

    ori, fake, bg = torch.tensor([0.3, 0.5]), torch.tensor([0.2, 0.1]), torch.tensor([0.7, 0.4])
    got = star_mbce(ori, fake, 0.5, bg, torch.tensor(0.25))
    assert got.item() == pytest.approx(((0.3 + 0.1 + 0.175) + (0.5 + 0.05 + 0.1)) / 1.75)
    assert star_mbce(ori, None, 0.0, bg, torch.tensor(0.0)).item() == pytest.approx(0.8)


def test_replayed_features_without_noise_are_the_scaled_prototype_and_average_to_it():
    from methods.star import replay_features

    p = F.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    record = {"prototypes": p, "noise": torch.zeros(2, 8, dtype=torch.float64),
              "norm_mean_and_std": torch.tensor([[3.0, 5.0], [0.0, 0.0]], dtype=torch.float64)}
    x = replay_features(record, torch.tensor([0, 1, 1]), "channel")
    assert torch.allclose(x, torch.stack([3 * p[0], 5 * p[1], 5 * p[1]]))
    record["noise"] = torch.full((2, 8), 0.3, dtype=torch.float64)
    record["norm_mean_and_std"][1] = 0.5
    torch.manual_seed(0)
    many = replay_features(record, torch.zeros(20000, dtype=torch.long), "vector")
    assert torch.allclose(many.mean(0), 3 * p[0], atol=0.05)


def test_ocfm_is_the_masked_mean_square_and_zero_on_an_empty_region():
    gen = torch.Generator().manual_seed(4)
    f, f_old = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    w = torch.rand(2, 1, 3, 3, generator=gen)
    explicit = sum(float(w[b, 0, i, j]) * float((f[b, k, i, j] - f_old[b, k, i, j]) ** 2)
                   for b in range(2) for k in range(4) for i in range(3) for j in range(3)) / (4 * float(w.sum()))
    assert L.masked_feature_mse(f, f_old, w).item() == pytest.approx(explicit, rel=1e-5)
    assert L.masked_feature_mse(f, f_old, torch.zeros_like(w)).item() == 0.0


def test_sad_is_the_mean_inverse_distance_to_the_nearest_prototype_and_an_absent_class_gives_one():
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    masks = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    masks[0, 0, 0, :] = 1.0
    masks[1, 0, 1, 1] = 0.5  # class 0 present, class 1 absent
    protos = F.normalize(torch.randn(3, 3, generator=gen, dtype=torch.float64), dim=1)
    unit = f / f.norm(dim=1, keepdim=True)
    centre = (unit[0, :, 0, 0] + unit[0, :, 0, 1] + 0.5 * unit[1, :, 1, 1])
    centre = centre / centre.norm()
    d = min(float((centre - p).norm()) for p in protos)
    assert L.prototype_separation(f, masks, protos).item() == pytest.approx((1 / d + 1.0) / 2, rel=1e-10)


def test_old_prediction_rules():
    from methods.star import old_prediction

    logits = torch.tensor([[5.0, 0.3, -1.0], [5.0, 0.6, 0.2], [5.0, -0.2, -3.0]]).T.reshape(1, 3, 1, 3)
    assert old_prediction(logits, "logit").flatten().tolist() == [0, 1, 0]
    assert old_prediction(logits, "sigmoid").flatten().tolist() == [1, 1, 0]


def test_star_gives_old_classifiers_no_gradient_and_replays_without_touching_the_backbone():
    from methods.base import Batch
    from methods.star import Replay, STARLoss

    _cfg_, stack, model, old = _models("STAR", 1)
    star = stack.method
    record = {"classes": list(range(1, 16)), "prototypes": F.normalize(torch.randn(15, 256), dim=1),
              "noise": torch.full((15, 256), 0.1), "norm_mean_and_std": torch.stack([torch.full((15,), 2.0),
                                                                                     torch.full((15,), 0.1)]),
              "numbers": torch.full((16,), 100.0)}
    term = STARLoss(method=star, model=model, step=1, n_old=16, class_ids=[16], pos_weight=4.0, record=record)
    term.replay = Replay(index=torch.arange(15).repeat(3), rho=2.0, counts={})
    x = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :16] = 16
    with torch.no_grad():
        logits_old, extras_old = old(x)
    logits_old[:, 3, :, 20:] = 9.0  # the old model sees class 3 in part of the background
    logits, extras = model.train()(x)
    out = term(Batch(images=x, labels=labels, logits=logits, extras=extras, logits_old=logits_old,
                     extras_old=extras_old, n_old=16, n_new=1))
    assert set(out) == {"loss_mbce", "loss_ac", "loss_ocfm", "loss_sad"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    for c in model.cls[1:-1]:
        assert c.weight.grad is None or c.weight.grad.abs().sum() == 0
    assert model.cls[-1].weight.grad.abs().sum() > 0
    # the replay term alone reaches the new classifier and nothing else
    model.zero_grad()
    from methods.star import replay_features
    feats = replay_features(record, term.replay.index, "channel")
    (feats @ model.cls[-1].weight.flatten(1).t()).sum().backward()
    assert all(p.grad is None for p in model.body.parameters())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    """Fewer images than the shared synthetic VOC: enough for every step of 15-1 and a memory, quicker to train."""
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("dkd_star_data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=60, n_val=20, seed=0)
    return str(root)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a, b, what=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _same(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, what)
    else:
        assert a == b, (what, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("awt", [False, True], ids=["plain", "AWT"])
@pytest.mark.parametrize("method", ["DKD", "DKD-M", "STAR", "STAR-M"])
def test_three_steps_killed_in_step_2_resume_to_the_same_bytes(small_voc, tmp_path, monkeypatch, method, awt):
    import run
    import train

    name = method.replace("-", "") + ("_AWT" if awt else "")
    base = ["--method", method, "--name", name, "--batch_size", "4", "--epochs", "2", "--ckpt_interval", "1"]
    base += ["--mem_size", "8"] if method.endswith("-M") else []
    base += ["--att", "25", "--mask_att"] if awt else []
    full, killed = tmp_path / "full", tmp_path / "killed"
    # steps 0 and 1 with one epoch each (what step 2 starts from), step 2 with two, interrupted after the first
    assert run.main(smoke_args(small_voc, full, task="15-1", steps=(0, 1), extra=[*base, "--lr", "0.01",
                                                                                    "0.001", "--epochs", "1"])) == 0
    shutil.copytree(full, killed)
    assert run.main(smoke_args(small_voc, full, task="15-1", steps=(2,), extra=[*base, "--lr", "0.001"])) == 0
    args = smoke_args(small_voc, killed, task="15-1", steps=(2,), extra=[*base, "--lr", "0.001"])
    original = interrupt_at_epoch(monkeypatch, 1)
    assert run.main(args) == 130
    partial = killed / "ckpt" / f"15-1-voc_{name}_2.partial.pth"
    assert partial.exists()
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert run.main(args) == 0
    a, b = _state(full / "ckpt" / f"15-1-voc_{name}_2.pth"), _state(killed / "ckpt" / f"15-1-voc_{name}_2.pth")
    _same(a["model_state"], b["model_state"], "model_state")
    rows = (full / "results" / f"test_voc_15-1_{name}.csv").read_text()
    assert rows == (killed / "results" / f"test_voc_15-1_{name}.csv").read_text()
    assert [r.split(",")[0] for r in rows.splitlines()] == ["0", "1", "2"]
    if method.startswith("STAR"):
        record = _state(full / "ckpt" / f"15-1-voc_{name}_2.prototypes.pth")
        _same(record, _state(killed / "ckpt" / f"15-1-voc_{name}_2.prototypes.pth"), "record")
        assert set(record) == {"classes", "numbers", "prototypes", "norm_mean_and_std", "noise"}
        assert record["prototypes"].shape == (17, 256) == record["noise"].shape
        assert record["norm_mean_and_std"].shape == (2, 17) and record["numbers"].shape == (18,)
        assert all(v.dtype in (torch.float32, torch.float64) for v in record.values() if torch.is_tensor(v))
        assert os.path.getsize(full / "ckpt" / f"15-1-voc_{name}_2.prototypes.pth") < 64_000  # no image in it
    if method.endswith("-M"):
        memory = (full / "ckpt" / f"15-1-voc_{name}_memory.json").read_text()
        assert '"step_2"' in memory and memory == (killed / "ckpt" / f"15-1-voc_{name}_memory.json").read_text()
    if awt:
        assert list((full / "channels").rglob("step2_*.pt"))


@pytest.mark.parametrize("argv,message", [
    (["--method", "DKD", "--nest"], "NeST pre-tunes a softmax classifier"),
    (["--method", "STAR", "--dropclass"], "--method STAR trains with its own losses"),
    (["--method", "DKD", "--dataset", "cityscapes_domain", "--task", "11-5"], "DKD is class-incremental"),
    (["--method", "STAR", "--dkd_split", "product"], "--dkd_split is DKD's"),
    (["--method", "DKD", "--pkd", "3"], "--pkd belongs to --method STAR or STAR-M"),
    (["--method", "MiB", "--mem_size", "8"], "--mem_size belongs to --method SSUL or SSUL-M or DKD or DKD-M"),
    (["--method", "DKD", "--dkd_awt_variant", "add"], "acts on AWT's transfer into the new classifier"),
])
def test_combinations_that_cannot_run_are_refused_in_one_line(argv, message):
    from experiment.config import parse_config
    from methods.stack import build_method
    from utils.errors import UserError

    with pytest.raises(UserError, match=message):
        build_method(parse_config(argv))


@pytest.mark.slow
def test_star_m_with_awt_survives_a_sigkill_in_step_2(small_voc, tmp_path):
    """The most stateful of the four (memory, prototype records, replay draws, AWT mask) killed with SIGKILL while
    step 2 trains, then rerun: the same bytes as the run that was not killed."""
    import signal
    import subprocess
    import sys
    import time

    import run
    from conftest import ROOT

    base = ["--method", "STAR-M", "--name", "SM", "--batch_size", "4", "--mem_size", "8", "--att", "25",
            "--mask_att", "--ckpt_interval", "1", "--threads", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run.main(smoke_args(small_voc, full, task="15-1", steps=(0, 1),
                               extra=[*base, "--lr", "0.01", "0.001"])) == 0
    shutil.copytree(full, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def command(out):
        args = smoke_args(small_voc, out, task="15-1", steps=(2,), extra=[*base, "--lr", "0.001", "--epochs", "3"])
        return [sys.executable, os.path.join(ROOT, "run.py"), *args]

    ref = subprocess.Popen(command(full), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    proc = subprocess.Popen(command(killed), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    partial = killed / "ckpt" / "15-1-voc_SM_2.partial.pth"
    try:
        deadline = time.time() + 300
        while not partial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and partial.exists(), "no in-step checkpoint of step 2 before the run ended"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "ckpt" / "15-1-voc_SM_2.pth").exists()
    again = subprocess.run(command(killed), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming step from" in again.stdout + again.stderr
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    for suffix in (".pth", ".prototypes.pth"):
        a = _state(full / "ckpt" / f"15-1-voc_SM_2{suffix}")
        b = _state(killed / "ckpt" / f"15-1-voc_SM_2{suffix}")
        _same(a.get("model_state", a), b.get("model_state", b), suffix)
