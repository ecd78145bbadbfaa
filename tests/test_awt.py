"""AWT: closed-form attribution equals Captum's LayerIntegratedGradients, aggregation variants, channel selection,
classifier-init rules, mask files (methods/awt.py; docs/awt.md)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from methods import attribution, awt, channel_masks  # noqa: E402
from utils.errors import UserError  # noqa: E402

pytest.importorskip("captum")
segmentation_module = pytest.importorskip("segmentation_module")

N_IMAGES = 4
SIZE = 64


def cfg_of(*args):
    from experiment.config import parse_config

    return parse_config(list(args))


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return frozen(segmentation_module.make_model(backbone="resnet18", norm_act="abn", output_stride=16,
                                                 classes=[3, 2]))


@pytest.fixture(scope="module")
def images():
    return torch.randn(N_IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def labels():
    """Remapped labels with new classes 3 and 4 in blocks (one image has no new-class pixel: skipped)."""
    lab = torch.zeros(N_IMAGES, SIZE, SIZE, dtype=torch.long)
    lab[0, 8:40, 8:40] = 3
    lab[1, 20:64, 0:30] = 4
    lab[1, 0:16, 40:64] = 3
    lab[2, 32:64, 32:64] = 4
    lab[2, 0:5, 0:5] = 255
    return lab  # image 3: background only


@pytest.fixture(scope="module")
def attributions(model, images):
    """Per-image layer attributions from both implementations (Captum in the reference configuration)."""
    exact = attribution.ExactAttributor(model)(images)
    captum = attribution.CaptumAttributor(model, n_steps=50, internal_batch_size=25)(images)
    return exact, captum


def close(a, b, rel=1e-4):
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


# ------------------------------------------------------------------------------------------ exact == Captum
def test_exact_equals_captum_per_image(attributions):
    exact, captum = attributions
    assert exact.shape == captum.shape == (N_IMAGES, 256, SIZE // 16, SIZE // 16)
    assert close(exact, captum)


def test_exact_matches_captum_with_plain_reference_call(model, images, attributions):
    """Captum called exactly as the reference does (function = logits.sum((2,3)), default baseline)."""
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(lambda x: model(x)[0].sum(dim=(2, 3)), model.cls[0])
    with torch.enable_grad():
        att = lig.attribute(images[:1], target=0, n_steps=50, attribute_to_layer_input=True)
    att = att[0] if isinstance(att, (tuple, list)) else att
    assert close(attributions[0][:1], att)


@pytest.mark.parametrize("aggregation", attribution.AGGREGATIONS)
@pytest.mark.parametrize("per_class", [False, True])
def test_aggregations_same_scores_and_channels(attributions, labels, aggregation, per_class):
    exact, captum = attributions
    groups = [[3], [4]] if per_class else [[3, 4]]
    masks = attribution.attribution_masks(labels, exact.shape[-2:], groups)
    results = []
    for att in (exact, captum):
        acc = attribution.ScoreAccumulator(len(groups), aggregation)
        acc.update(att[:2], masks[:2])  # streamed in two batches
        acc.update(att[2:], masks[2:])
        results.append(acc.scores()[0])
    assert results[0].shape == (len(groups), 256)
    assert close(results[0], results[1])
    for pct in (10, 25, 50, 75):
        assert torch.equal(awt.select_top_channels(results[0], pct), awt.select_top_channels(results[1], pct))


def naive_scores(att, masks, aggregation):
    """The reference's formulas on the concatenation of the kept images."""
    keep = masks.flatten(1).amax(1) > 0
    a = att[keep] * masks[keep, None]
    if aggregation == "max_after_mean":
        return a.mean(0).amax(dim=(1, 2))
    if aggregation == "mean_after_max":
        return a.amax(dim=(2, 3)).mean(0)
    if aggregation == "mean_after_avg":
        return a.mean(dim=(2, 3)).mean(0)
    return a.mean(0).mean(dim=(1, 2))


@pytest.mark.parametrize("aggregation", attribution.AGGREGATIONS)
def test_streaming_equals_reference_formula(attributions, labels, aggregation):
    exact = attributions[0]
    masks = attribution.attribution_masks(labels, exact.shape[-2:], [[3, 4]])
    acc = attribution.ScoreAccumulator(1, aggregation)
    for i in range(N_IMAGES):
        acc.update(exact[i:i + 1], masks[i:i + 1])
    scores, used = acc.scores()
    assert used.tolist() == [3] and acc.skipped.tolist() == [1]
    assert close(scores[0], naive_scores(exact, masks[:, 0], aggregation).float(), 1e-5)


def test_accumulate_classes_is_cumulative(attributions, labels):
    exact = attributions[0]
    masks = attribution.attribution_masks(labels, exact.shape[-2:], [[3], [4]])
    acc = attribution.ScoreAccumulator(2, "max_after_mean")
    acc.update(exact, masks)
    reset, _ = acc.scores()
    cum, used = acc.scores(accumulate_groups=True)
    assert torch.equal(reset[0], cum[0])
    both = torch.cat([exact * masks[:, 0:1], exact * masks[:, 1:2]])
    keep = torch.cat([masks[:, 0], masks[:, 1]]).flatten(1).amax(1) > 0
    assert used.tolist() == [int(keep[:N_IMAGES].sum()), int(keep.sum())]
    assert close(cum[1], both[keep].mean(0).amax(dim=(1, 2)).float(), 1e-5)


def test_channel_importance_end_to_end_both_methods(model, images, labels):
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    res = {m: attribution.channel_importance(model, batches, [3, 4], method=m, n_steps=20, internal_batch_size=20)
           for m in ("exact", "captum")}
    assert close(res["exact"].scores, res["captum"].scores)
    assert res["exact"].n_images == 4 and res["exact"].n_used.tolist() == [3]
    assert res["exact"].n_skipped.tolist() == [1]
    per = attribution.channel_importance(model, batches, [3, 4], per_class=True)
    assert per.scores.shape == (2, 256) and per.n_used.tolist() == [2, 2]
    whole = attribution.channel_importance(model, batches, [3, 4], mask_att=False)  # no --mask_att: whole image
    assert whole.n_used.tolist() == [4] and whole.n_skipped.tolist() == [0]


def test_all_images_skipped_is_an_error(model, images):
    background_only = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    with pytest.raises(UserError, match="skipped"):
        attribution.channel_importance(model, [(images[:2], background_only)], [3, 4])


def test_column_sums_generic_sizes():
    assert torch.allclose(attribution.upsample_column_sums((32, 32), (512, 512)), torch.full((32, 32), 256.0))
    a = attribution.upsample_column_sums((3, 5), (40, 70))
    assert a.shape == (3, 5)
    assert abs(float(a.sum()) - 40 * 70) < 1e-3  # every output pixel's weights sum to 1


def test_non_square_input_matches_captum(model):
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    exact = attribution.ExactAttributor(model)(x)
    captum = attribution.CaptumAttributor(model, n_steps=10, internal_batch_size=10)(x)
    assert close(exact, captum)


# ------------------------------------------------------------------------------------------ refusals
def _bad_models(model):
    out = {}
    m = copy.deepcopy(model)
    m.cls[0] = torch.nn.Conv2d(256, 3, 3, padding=1)
    out["3x3"] = m
    m = copy.deepcopy(model)
    m.cls[0] = torch.nn.Conv2d(256, 3, 1, bias=False)
    out["no bias"] = m

    class CosineConv(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(torch.nn.functional.normalize(x, dim=1))

    m = copy.deepcopy(model)
    m.cls[0] = CosineConv(256, 3, 1)
    out["subclass"] = m
    m = copy.deepcopy(model)
    m.cls[0].register_forward_hook(lambda mod, i, o: o.relu())
    out["hook"] = m
    m = copy.deepcopy(model)
    m.forward = lambda x: model(x)
    out["instance forward"] = m

    class Softmaxed(segmentation_module.IncrementalSegmentationModule):
        def forward(self, x, ret_intermediate=False):
            logits, extras = super().forward(x, ret_intermediate)
            return logits.softmax(1), extras

    m = copy.deepcopy(model)
    m.__class__ = Softmaxed
    out["softmax forward"] = m
    return out


def test_exact_refuses_non_affine_models(model):
    for name, bad in _bad_models(model).items():
        with pytest.raises(UserError, match="captum"):
            attribution.ExactAttributor(bad)
        assert name


def test_exact_refuses_cosine_and_multimodal_flags(model):
    with pytest.raises(UserError, match="cosine"):
        attribution.check_exact_supported(model, cfg_of("--cosine"))
    with pytest.raises(UserError, match="multi-modal"):
        attribution.check_exact_supported(model, cfg_of("--nb_background_modes", "2"))


def test_numerical_affinity_check_catches_a_non_affine_forward(model, images):
    bad = _bad_models(model)["softmax forward"]
    attributor = attribution.ExactAttributor.__new__(attribution.ExactAttributor)
    attributor.model, attributor.verify, attributor._cache = bad, True, {}
    with pytest.raises(UserError, match="not affine"):
        attributor(images[:1])


# ------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("att,k", [(10, 26), (25, 64), (50, 128), (75, 192), (100, 256), (1, 3), (0.1, 1),
                                   (33.3, 85), (12.5, 32)])
def test_select_top_channels_counts(att, k):
    scores = torch.randn(256, generator=torch.Generator().manual_seed(0))
    mask = awt.select_top_channels(scores, att)
    assert mask.dtype == torch.bool and mask.shape == (256,) and int(mask.sum()) == k
    assert float(scores[mask].min()) >= float(scores[~mask].max()) if k < 256 else True


def test_select_top_channels_rows_ties_and_errors():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = awt.select_top_channels(scores, 50)
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    for bad in (0, -5, 100.5):
        with pytest.raises(UserError):
            awt.select_top_channels(scores, bad)


# ------------------------------------------------------------------------------------------ init plan
@pytest.mark.parametrize("args,expected", [
    ([], None),
    (["--no_att", "--att", "25", "--orig_init"], None),
    (["--att", "25", "--mask_att"], ("attribution", False, False, False)),
    (["--orig_init", "--att", "25"], ("attribution", True, False, False)),
    (["--att", "25", "--copy_bias"], ("attribution", False, False, True)),
    (["--att", "25", "--copy"], ("attribution", False, True, False)),
    (["--random_channels", "--rand", "10"], ("random", False, False, False)),
    (["--att", "25", "--random_channels", "--rand", "10"], ("random", False, False, False)),
    (["--orig_init"], (None, True, False, False)),
    (["--init_balanced"], (None, True, False, False)),
    (["--method", "MiB"], (None, True, False, False)),
    (["--method", "PLOP"], (None, True, False, False)),
    (["--method", "MiB", "--att", "25", "--mask_att"], ("attribution", False, False, False)),
    (["--method", "MiB", "--no_att"], None),
])
def test_classifier_init_plan(args, expected):
    plan = awt.classifier_init_plan(cfg_of(*args))
    if expected is None:
        assert plan is None
    else:
        assert (plan["mask_source"], plan["orig_init"], plan["copy"], plan["copy_bias"]) == expected


@pytest.mark.parametrize("args,match", [
    (["--att", "150"], "outside"), (["--att", "-1"], "outside"),
    (["--att", "25", "--mean_after_max", "--avg_after_mean"], "mutually exclusive"),
    (["--random_channels"], "--rand"),
])
def test_invalid_flags(args, match):
    with pytest.raises(UserError, match=match):
        awt.classifier_init_plan(cfg_of(*args))


def test_random_channel_mask_seeded():
    a = awt.random_channel_mask(cfg_of("--random_channels", "--rand", "20"), 256)
    b = awt.random_channel_mask(cfg_of("--random_channels", "--rand", "20"), 256)
    c = awt.random_channel_mask(cfg_of("--random_channels", "--rand", "20", "--random_seed", "7"), 256)
    assert a.dtype == torch.float32 and int(a.sum()) == 20 and set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dataset_defaults_table():
    assert awt.dataset_defaults("ade", "100-5") == {"ig_steps": 30, "max_images": 2001}  # behaviour notes 11.5
    assert awt.dataset_defaults("ade", "50") == {"ig_steps": 30, "max_images": 5001}
    assert awt.dataset_defaults("ade", "50-50") == {"ig_steps": 30, "max_images": 5001}  # the alias of 50
    assert awt.dataset_defaults("voc", "15-1") == {"ig_steps": 50, "max_images": None}
    assert awt.resolved_ig_steps(cfg_of("--dataset", "ade", "--att", "25", "--ig_steps", "7")) == 7


# ------------------------------------------------------------------------------------------ files
BASE = ["--dataset", "voc", "--task", "15-1", "--name", "exp", "--att", "25", "--mask_att"]


def test_channels_path_is_stable_and_from_config():
    cfg = cfg_of(*BASE)
    path = awt.channels_path(cfg, 1)
    assert path == awt.channels_path(cfg_of(*BASE), 1)
    assert path.startswith("channels/15-1-voc_exp/step1_union_att25_max_after_mean_")
    assert path == "channels/15-1-voc_exp/step1_union_att25_max_after_mean_05136062.pt"  # never changes silently
    assert awt.channels_path(cfg, 1, per_class=True).startswith("channels/15-1-voc_exp/step1_class_att25_")
    # the previous checkpoint's location never enters the path (reference bug 8.1 #13)
    assert awt.channels_path(cfg_of(*BASE, "--checkpoint", "elsewhere", "--step_ckpt", "x/y.pth"), 1) == path
    differs = [["--att", "10"], ["--mean_after_max"], ["--random_seed", "1"], ["--crop_size", "256"],
               ["--att_max_images", "9"], ["--overlap"], ["--channels_dir", "m"]]
    for extra in differs:
        assert awt.channels_path(cfg_of(*BASE, *extra), 1) != path, extra
    assert "_nomask_" in awt.channels_path(cfg_of(*[a for a in BASE if a != "--mask_att"]), 1)
    assert "_cum_" in awt.channels_path(cfg_of(*BASE, "--att_accumulate_classes"), 2, per_class=True)
    assert channel_masks.scores_path(path).endswith("_scores.pt")


def _fake_dataset(n=4, size=SIZE, new=16):
    gen = torch.Generator().manual_seed(5)
    items = []
    for i in range(n):
        lab = torch.zeros(size, size, dtype=torch.long)
        lab[(i * 8) % 32:(i * 8) % 32 + 32, 16:48] = new
        items.append((torch.randn(3, size, size, generator=gen), lab))
    return items


@pytest.fixture
def voc_old_model():
    torch.manual_seed(2)
    return frozen(segmentation_module.make_model(backbone="resnet18", norm_act="abn", output_stride=16,
                                                 classes=[16]))


def test_compute_or_load_mask_writes_then_reuses(tmp_path, voc_old_model, monkeypatch):
    cfg = cfg_of(*BASE, "--channels_dir", str(tmp_path), "--batch_size", "3")
    state = torch.get_rng_state()
    mask = awt.compute_or_load_mask(cfg, 1, voc_old_model, "cpu", dataset=_fake_dataset())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    path = awt.channels_path(cfg, 1)
    saved = torch.load(path, weights_only=True)
    assert saved.dtype == torch.bool and saved.shape == (256,) and saved.device.type == "cpu"
    assert int(mask.sum()) == 64 and torch.equal(saved, mask)
    meta = torch.load(channel_masks.scores_path(path), weights_only=True)
    assert meta["scores"].shape == (1, 256) and meta["meta"]["new_classes"] == [16]

    def boom(*a, **k):
        raise AssertionError("recomputed although the file exists")

    monkeypatch.setattr(awt, "compute_mask", boom)
    assert torch.equal(awt.compute_or_load_mask(cfg, 1, voc_old_model, "cpu"), mask)
    # a different previous-step model is detected through the classifier fingerprint
    other = copy.deepcopy(voc_old_model)
    with torch.no_grad():
        other.cls[0].weight.add_(1.0)
    with pytest.raises(UserError, match="different previous-step model"):
        awt.compute_or_load_mask(cfg, 1, other, "cpu")
    assert awt.compute_or_load_mask(cfg_of(*BASE[:-3]), 1, voc_old_model, "cpu") is None  # no --att


def test_mask_file_size_is_validated(tmp_path, voc_old_model):
    cfg = cfg_of(*BASE, "--channels_dir", str(tmp_path))
    path = awt.channels_path(cfg, 1)
    Path(path).parent.mkdir(parents=True)
    torch.save(torch.ones(128, dtype=torch.bool), path)
    with pytest.raises(UserError, match=Path(path).name):
        awt.compute_or_load_mask(cfg, 1, voc_old_model, "cpu")
    ref = torch.zeros(256, 1, 1, dtype=torch.bool)  # the reference's layout is accepted
    ref[:64] = True
    torch.save(ref, path)
    assert awt.compute_or_load_mask(cfg, 1, voc_old_model, "cpu").shape == (256,)


def test_per_class_mask_file_and_detection(tmp_path, voc_old_model):
    base = ["--dataset", "voc", "--task", "15-5", "--name", "exp", "--att", "25", "--mask_att",
            "--channels_dir", str(tmp_path)]
    data = [(img, torch.where(lab > 0, 16 + i % 5, 0)) for i, (img, lab) in enumerate(_fake_dataset(5))]
    cfg_pc = cfg_of(*base, "--att_per_class")
    mask = awt.compute_or_load_mask(cfg_pc, 1, voc_old_model, "cpu", dataset=data)
    assert mask.shape == (5, 256) and mask.sum(1).tolist() == [64] * 5
    # without --att_per_class the per-class file is picked up when no union file exists
    assert torch.equal(awt.compute_or_load_mask(cfg_of(*base), 1, voc_old_model, "cpu"), mask)


def test_prepare_new_classifier_applies_the_mask(tmp_path, voc_old_model):
    cfg = cfg_of(*BASE, "--channels_dir", str(tmp_path))
    mask = torch.zeros(256, dtype=torch.bool)
    mask[::4] = True
    channel_masks.write_mask(awt.channels_path(cfg, 1), mask)
    torch.manual_seed(0)
    new = segmentation_module.make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[16, 1])
    new.load_state_dict(voc_old_model.state_dict(), strict=False)
    before = new.cls[1].weight.detach().clone()
    plan = awt.prepare_new_classifier(cfg, 1, new, voc_old_model, "cpu")
    w_bg = new.cls[0].weight[0:1].detach()
    assert torch.equal(plan["channel_mask"], mask)
    assert torch.allclose(new.cls[1].weight, before + w_bg * mask[None, :, None, None])
    # AWT asked but nothing can produce a mask: an error, not a random classifier
    cfg_missing = cfg_of(*BASE, "--channels_dir", str(tmp_path / "empty"), "--data_root", str(tmp_path / "none"))
    with pytest.raises(UserError):
        awt.prepare_new_classifier(cfg_missing, 1, copy.deepcopy(new), voc_old_model, "cpu")
