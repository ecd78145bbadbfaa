"""Registry, presets, flags, check_supported and the Criterion on a tiny model (methods/__init__.py)."""
import argparse
import math

import pytest
import torch

from methods import PRESETS, TERMS, Batch, StepContext, add_method_args, build_criterion, check_supported
from utils import loss as L
from utils.errors import UserError

EXPECTED_PRESETS = {  # behaviour.md 1.17, PLOP/AWT values
    "FT": {},
    "LWF": {"loss_kd": 100},
    "LWF-MC": {"icarl": True, "icarl_importance": 10},
    "ILT": {"loss_kd": 100, "loss_de": 100},
    "EWC": {"regularizer": "ewc", "reg_importance": 100},
    "RW": {"regularizer": "rw", "reg_importance": 100},
    "PI": {"regularizer": "pi", "reg_importance": 100},
    "MiB": {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True},
    "PLOP": {"pod": "local", "pod_factor": 0.01, "pod_logits": True,
             "pod_options": {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}},
             "pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True, "init_balanced": True},
}
LATER_PRESETS = {  # methods with their own plugins (docs/ssul.md, docs/rcil.md)
    "SSUL": {"lr_min": 1e-06},
    "SSUL-M": {"lr_min": 1e-06},
    "RCIL": {"loss_kd": 100, "unce": True, "unkd": True},
    "DKD": {}, "DKD-M": {}, "STAR": {}, "STAR-M": {},  # ADE20K: warm-up poly (their preset_for, tests/test_dkd_star.py)
    "WILSON": {"alpha": 0.5},  # WILSON's meaning and default of --alpha (docs/wilson.md)
    "SimFormer": {"head": "maskformer", "mask_loss": 1.0, "mask_comp": 0.15},  # docs/simformer.md
}


def _parser():
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    try:
        from methods.awt import add_awt_args
    except ImportError:
        parser.add_argument("--init_balanced", action="store_true", default=False)
    else:
        add_awt_args(parser)
    return parser


def _parse(argv, method=None):
    parser = _parser()
    if method:
        parser.set_defaults(**PRESETS[method])
    return parser.parse_args(argv)


def test_presets_are_pinned():
    assert PRESETS == {**EXPECTED_PRESETS, **LATER_PRESETS}
    assert list(PRESETS) == list(EXPECTED_PRESETS) + list(LATER_PRESETS)


@pytest.mark.parametrize("method", list(EXPECTED_PRESETS))
def test_every_preset_parses_to_its_values(method):
    ns = _parse([], method)
    for key, value in EXPECTED_PRESETS[method].items():
        assert getattr(ns, key) == value
    check_supported(ns)


def test_explicit_flag_beats_preset_and_defaults():
    ns = _parse(["--loss_kd", "3", "--threshold", "0.5"], "PLOP")
    assert ns.loss_kd == 3 and ns.threshold == 0.5 and ns.pod == "local"
    plain = _parse([])
    assert plain.loss_kd == 0  # PLOP/MiB default, not AWT's 10
    assert plain.spp_scales == [1, 2, 4] and plain.pod_factor == 5.0 and plain.reg_importance == 1.0


def test_method_names_case_insensitive():
    assert _parse(["--method", "MIB"]).method == "MiB"
    assert _parse(["--method", "lwf-mc"]).method == "LWF-MC"
    with pytest.raises(SystemExit):
        _parse(["--method", "nope"])


def test_registry_order():
    assert list(TERMS) == ["pseudo", "classification", "mask_classification", "kd", "ilt", "pod", "regularizer"]


REJECTED = [["--kd_bce_sig"], ["--exkd_gt"], ["--exkd_sum"], ["--nca"], ["--cosine"], ["--nb_background_modes", "2"],
            ["--init_multimodal", "max"], ["--align_weight", "old"], ["--kd_mask", "new"],
            ["--temperature_apply", "all"], ["--pseudo_soft", "soft_certain"], ["--pseudo_ablation", "removed_errors"],
            ["--sample_weights_new", "2"], ["--entropy_min", "0.1"], ["--kd_new"], ["--pod_deeplab_mask"],
            ["--pod_large_logits"], ["--deeplab_mask_downscale"], ["--ce_on_new"], ["--pseudo", "bogus"],
            ["--pod", "local", "--pod_options", '{"x": 1}'], ["--ce_on_pseudo"]]


@pytest.mark.parametrize("argv", REJECTED, ids=lambda a: a[0])
def test_unsupported_flags_are_rejected_naming_the_flag(argv):
    with pytest.raises(UserError) as err:
        check_supported(_parse(argv))
    assert "\n" not in str(err.value)
    flag = argv[0] if argv[0] != "--pod" else "--pod_options"
    assert flag in str(err.value)


def test_dead_flags_are_accepted_and_marked_ignored():
    parser = _parser()
    helps = {a.dest: a.help for a in parser._actions}
    for dest in ("kd_need_labels", "kd_category", "entropy_min_mean_pixels", "pod_apply", "pod_interpolate_last",
                 "step_threshold"):
        assert helps[dest].startswith("(ignored")
    check_supported(_parse(["--kd_need_labels", "--kd_category", "--pod_apply", "x", "--pod_interpolate_last",
                            "--entropy_min_mean_pixels", "--step_threshold", "0.1"]))


# ---- criterion on a tiny model -------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 1)
        self.cls = torch.nn.ModuleList([torch.nn.Conv2d(4, c, 1) for c in classes])

    def forward(self, x, ret_intermediate=False):
        f = self.body(x)
        logits = torch.cat([c(f) for c in self.cls], 1)
        return logits, {"pre_logits": f, "body": f, "attentions": [f, f.relu()], "sem_logits_small": logits}


def _step(method, argv=(), step=1, trainer_state=None):
    torch.manual_seed(0)
    classes = [3, 2][: step + 1]
    cfg = _parse(list(argv), method)
    model = Tiny(classes)
    old = Tiny(classes[:-1]).eval().requires_grad_(False) if step else None
    x = torch.randn(2, 3, 6, 6)
    y = torch.randint(0, sum(classes), (2, 6, 6))
    y[:, 0] = 255
    ctx = StepContext(step=step, classes=classes, model=model, model_old=old, train_loader=[(x, y)],
                      trainer_state=trainer_state or {})
    crit = build_criterion(cfg, ctx)
    crit.before_step(ctx)
    logits, extras = model(x, ret_intermediate=crit.needs_features)
    lo, eo = old(x, True) if crit.needs_old_model else (None, None)
    batch = Batch(images=x, labels=y, logits=logits, extras=extras, logits_old=lo, extras_old=eo,
                  n_old=ctx.n_old, n_new=ctx.n_new)
    return crit, batch, model


EXPECTED_KEYS = {"FT": {"loss_ce"}, "LWF": {"loss_ce", "loss_kd"}, "LWF-MC": {"loss_ce", "loss_icarl"},
                 "ILT": {"loss_ce", "loss_kd", "loss_de"}, "EWC": {"loss_ce"}, "RW": {"loss_ce"}, "PI": {"loss_ce"},
                 "MiB": {"loss_ce", "loss_kd"}, "PLOP": {"loss_ce", "loss_pod"}}


@pytest.mark.parametrize("method", list(EXPECTED_PRESETS))
def test_every_preset_gives_finite_named_losses(method):
    for step in (0, 1):
        crit, batch, model = _step(method, step=step)
        if step == 0:
            assert not crit.needs_old_model
        losses = crit(batch)
        assert set(losses) == (EXPECTED_KEYS[method] if step else {"loss_ce"})
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        crit.after_backward(model)


def test_mib_uses_plain_ce_at_step_0_and_unce_after():
    crit, batch, _ = _step("MiB", step=0)
    assert crit(batch)["loss_ce"].item() == pytest.approx(L.cross_entropy(batch.logits, batch.labels).mean().item())
    crit, batch, _ = _step("MiB", step=1)
    losses = crit(batch)
    assert losses["loss_ce"].item() == pytest.approx(
        L.unbiased_cross_entropy(batch.logits, batch.labels, 3).mean().item())
    kd = L.unbiased_knowledge_distillation(batch.logits, batch.logits_old).mean().item()
    assert losses["loss_kd"].item() == pytest.approx(10 * kd)


def test_kd_scheduling_and_ilt():
    crit, batch, _ = _step("ILT", ["--kd_scheduling"])
    losses = crit(batch)
    kd = L.knowledge_distillation(batch.logits, batch.logits_old).mean().item()
    assert losses["loss_kd"].item() == pytest.approx(100 * kd * math.sqrt(5 / 2), rel=1e-5)
    mse = ((batch.extras["body"] - batch.extras_old["body"]) ** 2).mean().item()
    assert losses["loss_de"].item() == pytest.approx(100 * mse, rel=1e-5)


def test_icarl_variants():
    crit, batch, _ = _step("LWF-MC")
    losses = crit(batch)
    assert losses["loss_ce"].item() == pytest.approx(L.bce_with_ignore(batch.logits, batch.labels).mean().item())
    assert losses["loss_icarl"].item() == pytest.approx(
        10 * 3 * L.icarl_distillation(batch.logits, batch.logits_old).item(), rel=1e-5)
    crit, batch, _ = _step("LWF-MC", ["--icarl_disjoint", "--icarl_bkg"])
    losses = crit(batch)
    assert set(losses) == {"loss_ce"}
    expected = L.icarl_disjoint(batch.logits, batch.labels, batch.logits_old, bkg=True).mean().item()
    assert losses["loss_ce"].item() == pytest.approx(expected)


def test_plop_pseudo_labels_feed_the_classification_loss():
    crit, batch, _ = _step("PLOP", ["--threshold", "0.5"])
    original = batch.labels.clone()
    losses = crit(batch)
    assert torch.equal(batch.original_labels, original)
    ce = L.cross_entropy(batch.logits, batch.labels)
    assert losses["loss_ce"].item() == pytest.approx((ce * batch.pixel_weight).mean().item(), rel=1e-5)
    assert batch.pixel_weight.shape == (2, 1, 1)


def test_ce_on_pseudo():
    crit, batch, _ = _step("PLOP", ["--ce_on_pseudo", "--threshold", "0.5"])
    losses = crit(batch)
    mask = batch.pseudo_mask
    expected = (L.cross_entropy(batch.logits, batch.original_labels.masked_fill(mask, 255))
                + L.cross_entropy(batch.logits, batch.labels.masked_fill(~mask, 255)))
    assert losses["loss_ce"].item() == pytest.approx((expected * batch.pixel_weight).mean().item(), rel=1e-5)


def test_regularizer_state_goes_through_the_criterion():
    crit, batch, model = _step("EWC", step=0)
    sum(crit(batch).values()).backward()
    assert crit.after_backward(model) == {}
    state = crit.state_dict()
    assert set(state) == {"regularizer"} and state["regularizer"]["type"] == "ewc"
    crit1, batch1, model1 = _step("EWC", step=1, trainer_state=state)
    sum(crit1(batch1).values()).backward()
    extra = crit1.after_backward(model1)
    assert set(extra) == {"loss_reg"}


@pytest.mark.parametrize("mode", ["soft_certain", "soft_uncertain"])
def test_pseudo_soft_replaces_the_hard_loss_on_uncertain_pixels(mode):
    from utils.loss import soft_cross_entropy

    crit, batch, _ = _step("PLOP", ["--pseudo_soft", mode, "--pseudo_soft_factor", "0.5"])
    losses = crit(batch)
    not_bg = batch.original_labels >= batch.n_old
    certain = not_bg if mode == "soft_certain" else not_bg | batch.pseudo_mask
    expected = soft_cross_entropy(batch.logits, batch.labels, batch.logits_old, certain, 0.5)
    assert torch.allclose(losses["loss_ce"], (expected * batch.pixel_weight).mean())


def test_pseudo_soft_needs_entropy_pseudo_labels():
    with pytest.raises(UserError, match="--pseudo entropy"):
        check_supported(_parse(["--pseudo_soft", "soft_certain"]))


def test_terms_run_in_their_declared_order_not_import_order(monkeypatch):
    """``build_terms`` follows ``LossTerm.order`` (pseudo-labels rewrite the labels before classification reads
    them); a term registered late with a low order runs first."""
    from experiment.config import parse_config
    from methods import StepContext, build_criterion, registry
    from methods.base import LossTerm

    assert [t.name for t in registry.ordered_terms()][:2] == ["pseudo", "classification"]
    assert [t.order for t in registry.ordered_terms()] == sorted(t.order for t in registry.TERMS.values())

    class First(LossTerm):
        name, order = "first", 1

        @classmethod
        def build(cls, cfg, ctx):
            return cls()

        def __call__(self, batch):
            return {}

    monkeypatch.setitem(registry.TERMS, "first", First)
    cfg = parse_config(["--method", "PLOP", "--step", "1", "--task", "15-5"])
    ctx = StepContext(step=1, classes=[16, 5], model=None, model_old=torch.nn.Identity())
    names = [t.name for t in build_criterion(cfg, ctx).terms]
    assert names[0] == "first" and names.index("pseudo") < names.index("classification") < names.index("pod")
