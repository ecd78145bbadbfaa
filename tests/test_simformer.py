"""SimFormer's weak-shot task: the splits as data, the training items (novel pixels hidden, novel classes listed from
the augmented crop), the pixel-pair transfer against explicit computations, the refusals, and run.py on a synthetic
COCO-Stuff-10K layout killed and resumed to the same bytes with base / novel / all printed and stored."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.incremental import WeakShotSegmentation, build_datasets
from dataset.readers import READERS
from dataset.synthetic import generate
from dataset.tasks import score_groups
from dataset.weak_shot import weak_shot_split
from methods.base import Batch
from methods.pixel_pairs import BalanceCounts, SimNet, choose_partners, distill_loss, pair_grid, sample_points
from methods.simformer import PixelPairTransfer
from tests.conftest import kill_and_resume, smoke_args

SPEC_COCO_1 = [3, 6, 10, 11, 18, 19, 26, 27, 31, 34, 37, 38, 40, 41, 50, 53, 55, 59, 61, 68, 76, 82, 85, 90, 92, 94,
               103, 106, 108, 112, 113, 117, 120, 127, 129, 131, 141, 146, 155, 156, 159, 166, 169]
SPEC_ADE_1 = [1, 3, 6, 8, 10, 13, 17, 22, 23, 29, 33, 38, 41, 50, 51, 56, 67, 70, 71, 74, 77, 81, 92, 93, 98, 101, 102,
              103, 110, 113, 119, 121, 126, 127, 130, 136, 147, 149]


# ----------------------------------------------------------------------------------------------------------- splits
def test_splits_are_simformers_lists_in_this_frameworks_ids():
    assert weak_shot_split("coco_stuff_10k", "ws1").novel == tuple(SPEC_COCO_1)
    assert weak_shot_split("ade", "ws1").novel == tuple(c + 1 for c in SPEC_ADE_1)  # MaskFormer id k is label k + 1
    assert weak_shot_split("ade", "ws1").ignored == (0,)
    sizes = [len(weak_shot_split("coco_stuff_10k", f"ws{k}").novel) for k in range(1, 10)]
    assert sizes == [43, 43, 43, 43, 51, 59, 68, 76, 85]  # round(171/4), then int(171 r), r = 0.30 .. 0.50
    for k in range(4, 9):  # splits 4-9 are growing prefixes of one permutation
        assert set(weak_shot_split("coco_stuff_10k", f"ws{k}").novel) < set(weak_shot_split("coco_stuff_10k",
                                                                                            f"ws{k + 1}").novel)
    for k in range(1, 5):
        split = weak_shot_split("ade", f"ws{k}")
        assert len(split.novel) == 38 and len(split.base) == 112 and 0 not in split.base
    assert weak_shot_split("voc", "15-5") is None and score_groups("voc", "15-5", 0) is None
    base, novel = score_groups("coco_stuff_10k", "ws1", 0)
    assert sorted(base + novel) == list(range(171)) and novel == tuple(SPEC_COCO_1)


@pytest.fixture(scope="module")
def stuff(tmp_path_factory):
    root = tmp_path_factory.mktemp("stuff") / "coco_stuff_10k"
    return generate(str(root), "coco_stuff_10k", size=32, n_train=171, n_val=171, seed=3)["root"]


def _crop(box):
    def transform(image, label):
        image, label = image.crop(box), label.crop(box)
        return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
                torch.from_numpy(np.asarray(label, dtype=np.uint8).copy()))
    return transform


def test_items_hide_novel_pixels_and_list_the_novel_classes_left_in_the_crop(stuff, tmp_path):
    split = weak_shot_split("coco_stuff_10k", "ws1")
    reader = READERS["coco_stuff_10k"](stuff, "train")
    box = (0, 0, 16, 16)
    data = WeakShotSegmentation(reader, labels=list(range(171)), novel=split.novel, transform=_crop(box))
    seen_novel = 0
    for index in range(len(data)):
        image, label, aux = data[index]
        raw = np.array(Image.open(reader.samples[int(data.idxs[index])][1]).crop(box))
        present_novel = sorted(set(np.unique(raw).tolist()) & set(split.novel))
        assert torch.nonzero(aux["novel_labels"]).flatten().tolist() == present_novel
        assert torch.equal(label == 255, torch.from_numpy((raw == 255) | np.isin(raw, split.novel)))
        kept = label != 255
        assert torch.equal(label[kept], torch.from_numpy(raw)[kept])  # base pixels unchanged
        seen_novel += len(present_novel)
    assert seen_novel > 0


def test_ade_other_is_ignored_in_training_and_test(tmp_path):
    root = generate(str(tmp_path / "ade"), "ade", size=32, n_train=150, n_val=150, seed=0)["root"]
    train, _, test = build_datasets(dataset="ade", root=root, task="ws1", step=0, overlap=True, crop_size=32,
                                    cache_root=str(tmp_path / "cache"))
    assert isinstance(train, WeakShotSegmentation)
    assert int(train.lut[0]) == 255 and int(test.lut[0]) == 255 and int(test.lut[5]) == 5
    item = train[0]
    assert 0 not in item[1].unique().tolist() and item[2]["novel_labels"].shape == (151,)


# ------------------------------------------------------------------------------------------------ pixel-pair parts
def test_points_are_drawn_inside_the_region_then_outside_when_it_is_short():
    torch.manual_seed(0)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:4, 2:6] = True  # 8 pixels
    inside = sample_points(region, 5)
    assert region.flatten()[inside].all() and len(set(inside.tolist())) == 5
    spill = sample_points(region, 12)
    assert region.flatten()[spill].sum() == 8 and len(set(spill.tolist())) == 12


def test_pair_grid_pairs_every_point_of_the_first_with_every_point_of_the_second():
    a, b = torch.arange(6.).reshape(3, 2), 10 + torch.arange(4.).reshape(2, 2)
    grid = pair_grid(a, b)
    assert grid.shape == (6, 4)
    for i in range(3):
        for j in range(2):
            assert torch.equal(grid[i * 2 + j], torch.cat([a[i], b[j]]))


def test_partners_share_a_novel_class_when_one_exists():
    torch.manual_seed(0)
    novel = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    for _ in range(20):
        partners = choose_partners(novel, "cross")
        assert partners[0] == 2 and partners[2] == 0
        assert partners[1] != 1 and partners[3] != 3  # no image shares theirs: any other image
    assert choose_partners(novel, "self") == [0, 1, 2, 3]


def test_balance_weights_follow_a_25_iteration_window_starting_from_one_of_each():
    reference_neg, reference_pos = collections.deque([1], maxlen=25), collections.deque([1], maxlen=25)
    counts = BalanceCounts()
    torch.manual_seed(0)
    for _ in range(40):
        target = (torch.rand(2, 12, 12) < torch.rand(())).long()
        neg_w, pos_w = counts.update(target)
        sub = target[:, ::5, ::5]
        reference_neg.append(int((sub == 0).sum()))
        reference_pos.append(int((sub == 1).sum()))
        n, p = sum(reference_neg), sum(reference_pos)
        assert float(neg_w) == pytest.approx(p / (n + p)) and float(pos_w) == pytest.approx(n / (n + p))


def test_distillation_functions_match_their_formulas():
    t, s = torch.tensor([0.9, 0.2, 0.5, 0.0]), torch.tensor([0.7, 0.6, 0.3, 1.0])
    cce = distill_loss(t, s, "cce")
    for i in range(4):
        ti, si = float(t[i]), float(s[i])
        expected = -max(ti - 0.5, 0) * np.log(si + 1) - max(0.5 - ti, 0) * np.log(1 - si + 1)
        assert float(cce[i]) == pytest.approx(expected, abs=1e-6)
    ce = distill_loss(t, s, "ce")
    tc, sc = t.clamp(0.01, 0.99), s.clamp(0.01, 0.99)
    assert torch.allclose(ce, -tc * sc.log() - (1 - tc) * (1 - sc).log())


def _pair_batch(seed=0):
    torch.manual_seed(seed)
    b, d, h, w, c, q = 2, 8, 6, 6, 5, 4
    labels = torch.full((b, h, w), 255)
    labels[0, :3], labels[1, :2] = 1, 1  # base class 1 in both images
    labels[0, 3:, :3], labels[1, 4:] = 2, 3  # base classes 2 and 3
    novel_labels = torch.zeros(b, c)
    novel_labels[:, 4] = 1  # novel class 4 in both: a distillation pair
    extras = {"pre_logits": torch.randn(b, d, h, w, requires_grad=True),
              "mask_cls": torch.randn(b, q, c + 1, requires_grad=True),
              "mask_pred": torch.randn(b, q, h, w, requires_grad=True)}
    batch = Batch(images=torch.zeros(b, 3, h, w), labels=labels, logits=torch.zeros(b, c, h, w), extras=extras,
                  logits_old=None, extras_old=None, n_old=0, n_new=c, aux={"novel_labels": novel_labels})
    return batch


def _term(simnet, student="cross", points=10):
    return PixelPairTransfer(simnet=simnet, novel=[4], points=points, sim_weight=1.0, distill_weight=1.0, func="cce",
                             mode="cross", student=student, counts=BalanceCounts())


def test_simnet_loss_is_the_balanced_bce_of_cross_image_base_pairs_and_sees_detached_embeddings():
    batch = _pair_batch()
    simnet = SimNet(8, width=16).eval()
    term = _term(simnet)
    torch.manual_seed(5)
    out = term(batch)
    # the same draws by hand: partner of 0 is 1 and back; the common class is 1 for both pairs
    torch.manual_seed(5)
    partners = choose_partners(batch.aux["novel_labels"][:, [4]], "cross")
    assert partners == [1, 0]
    flat = batch.extras["pre_logits"].flatten(2).transpose(1, 2)
    labels = batch.labels
    losses, valids, targets = [], [], []
    for i, p in enumerate(partners):
        c = 1  # the only common base class: randint(1) draws 0
        torch.randint(1, ())
        idx = [torch.cat([sample_points(labels[j] == c, 8), sample_points(labels[j] != c, 2)]) for j in (i, p)]
        li, lp = labels[i].flatten()[idx[0]], labels[p].flatten()[idx[1]]
        targets.append((li[:, None] == lp[None, :]).float())
        valids.append(((li != 255)[:, None] | (lp != 255)[None, :]).float())
        with torch.no_grad():
            pred = simnet(pair_grid(flat[i][idx[0]], flat[p][idx[1]]))
        losses.append(F.binary_cross_entropy(pred.reshape(10, 10), targets[-1], reduction="none"))
    target = torch.stack(targets)
    sub = target[:, ::5, ::5]
    neg, pos = 1 + float((sub == 0).sum()), 1 + float((sub == 1).sum())
    weight = torch.where(target > 0, neg / (neg + pos), pos / (neg + pos))
    valid = torch.stack(valids)
    expected = (weight * torch.stack(losses) * valid).sum() / valid.sum()
    assert out["loss_pair_sim"].detach().item() == pytest.approx(float(expected), rel=1e-5)
    out["loss_pair_sim"].backward()
    assert batch.extras["pre_logits"].grad is None  # SimNet trains on detached embeddings
    assert any(p.grad is not None for p in simnet.parameters())


def test_distillation_student_pairs_cross_image_points_or_the_released_self_pairs():
    for student in ("cross", "self"):
        batch = _pair_batch(1)
        simnet = SimNet(8, width=16).eval()
        term = _term(simnet, student=student, points=6)
        torch.manual_seed(7)
        got = term._distill(batch, batch.extras["pre_logits"].flatten(2).transpose(1, 2), batch.labels != 255,
                            [1, 0], batch.aux["novel_labels"])
        torch.manual_seed(7)
        cls = batch.extras["mask_cls"].softmax(-1)[..., [4]]
        scores = torch.einsum("bqn,bqhw->bnhw", cls, batch.extras["mask_pred"].sigmoid()).flatten(2).transpose(1, 2)
        flat = batch.extras["pre_logits"].flatten(2).transpose(1, 2)
        losses = []
        for i, p in ((0, 1), (1, 0)):
            idx = [sample_points(batch.labels[j] == 255, 6) for j in (i, p)]
            teacher = simnet(pair_grid(flat[i][idx[0]], flat[p][idx[1]]))
            a = scores[i][idx[0]]
            other = scores[p][idx[1]] if student == "cross" else a
            s = F.relu(F.cosine_similarity(a[:, None], other[None], dim=-1)).flatten()
            losses.append(distill_loss(teacher, s, "cce").mean())
        assert got.detach().item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
        got.backward()
        assert batch.extras["mask_cls"].grad is not None and batch.extras["pre_logits"].grad is None


# ---------------------------------------------------------------------------------------------------------- run.py
SIMFORMER = ["--method", "SimFormer", "--backbone", "tv_resnet18", "--backbone_bn", "train", "--mask_queries", "8", "--mask_layers", "2",
             "--optimizer", "adamw", "--lr", "1e-4", "--clip_grad", "0.01", "--pair_loss", "1", "--pair_points", "12",
             "--batch_size", "4", "--epochs", "2"]


def _args(root, out, extra=()):
    args = smoke_args(root, out, dataset="coco_stuff_10k", task="ws1", extra=[*SIMFORMER, *extra])
    return [a for a in args if a not in ("--norm_act", "abn")]


def test_refusals_are_one_line(stuff, tmp_path, capsys):
    import run
    base = smoke_args(stuff, tmp_path, dataset="coco_stuff_10k", task="ws1")
    base = [a for a in base if a not in ("--norm_act", "abn")]
    cases = [(["--method", "SimFormer", "--backbone_bn", "train", "--pair_points", "50"], "--pair_loss"),
             (["--method", "MiB", "--mask_queries", "4"], "--mask_queries"),
             (["--method", "SimFormer", "--backbone_bn", "train", "--pair_loss", "1", "--task", "15-5", "--dataset",
               "voc"], "--pair_loss"),
             (["--method", "SimFormer"], "--backbone_bn train")]  # smoke_args: --no_pretrained
    for extra, needle in cases:
        assert run.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.mark.slow
def test_weak_shot_run_is_killed_and_resumed_to_the_same_bytes(stuff, tmp_path, monkeypatch, caplog):
    import run
    with caplog.at_level("INFO"):
        assert run.main(_args(stuff, tmp_path / "full")) == 0
    assert "weak-shot task ws1: base / novel / all" in caplog.text
    summary = next((tmp_path / "full" / "results").glob("*.md")).read_text()
    assert "old = base and new = novel classes" in summary
    args = _args(stuff, tmp_path / "killed")
    kill_and_resume(monkeypatch, args, 1)
    name = "ws1-coco_stuff_10k_Experiment_0.pth"
    a = torch.load(tmp_path / "full" / "ckpt" / name, weights_only=True)
    b = torch.load(tmp_path / "killed" / "ckpt" / name, weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    rows = [(tmp_path / d / "results" / "test_coco_stuff_10k_ws1_Experiment.csv").read_text()
            for d in ("full", "killed")]
    assert rows[0] == rows[1]


def test_pseudo_mask_keeps_novel_predictions_of_the_image_classes_under_the_base_truth():
    from evaluate import pseudo_mask
    base = torch.tensor([True, True, False, False, False])
    novel = torch.tensor([False, False, True, True, False])  # index 4: neither (an ignored class)
    label = torch.tensor([[0, 1, 2, 255], [2, 2, 255, 255]], dtype=torch.uint8)  # the image holds novel 2, not 3
    pred = torch.tensor([[2, 2, 1, 2], [3, 4, 2, 0]])
    expected = torch.tensor([[0, 1, 255, 2], [255, 255, 2, 255]])
    # base truth wins over any prediction; a novel prediction stays only for a novel class the image holds (2, not
    # 3); a base or ignored prediction off the base truth is 255
    assert torch.equal(pseudo_mask(pred, label, base, novel), expected)


@pytest.mark.slow
def test_simformer_star_writes_pseudo_masks_and_retrains_on_them(stuff, tmp_path, capsys):
    import evaluate
    import run
    args = _args(stuff, tmp_path, ["--epochs", "1"])
    for flag in ("--pair_loss", "--pair_points"):  # SimFormer without the pixel-pair transfer, for speed
        at = args.index(flag)
        del args[at:at + 2]
    first = args
    assert run.main(first) == 0
    masks = tmp_path / "pseudo"
    assert evaluate.main([*first, "--pseudo_labels", str(masks)]) == 0
    assert evaluate.main([*first, "--pseudo_labels", str(masks)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    reader = READERS["coco_stuff_10k"](stuff, "train")
    split = weak_shot_split("coco_stuff_10k", "ws1")
    novel_seen = 0
    for index, (image_path, _) in enumerate(reader.samples):
        truth = np.asarray(reader.load(index)[1])
        mask = np.asarray(Image.open(masks / (os.path.splitext(os.path.basename(image_path))[0] + ".png")))
        is_base = np.isin(truth, split.base)
        assert np.array_equal(mask[is_base], truth[is_base])
        off = mask[~is_base]
        assert set(np.unique(off).tolist()) <= {255} | (set(np.unique(truth).tolist()) & set(split.novel))
        novel_seen += int((off != 255).sum())
    assert novel_seen > 0  # the trained model predicted some novel pixels of its images' classes
    retrain = [*first, "--novel_has_mask", "--train_labels", str(masks), "--mask_comp", "0",
               "--checkpoint", str(tmp_path / "star")]
    assert run.main(retrain) == 0
    assert (tmp_path / "star" / "ws1-coco_stuff_10k_Experiment_0.pth").is_file()
    assert run.main([*retrain, "--mask_comp", "0.15"]) == 2
    assert "--mask_comp 0" in capsys.readouterr().err


def test_parameter_groups_follow_detectron2_and_the_backbone_batch_norms_stay_frozen():
    from methods.simformer import decay_groups, freeze_batch_norms
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.Embedding(5, 4))
    model = torch.nn.ModuleDict({"body": body, "head": head})
    groups = decay_groups([model], body, lr=1.0, body_lr=0.1, wd=1e-4)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_param[id(body[0].weight)] == (0.1, 1e-4) and by_param[id(body[1].weight)] == (0.1, 0.0)
    assert by_param[id(head[0].weight)] == (1.0, 1e-4)
    assert by_param[id(head[1].bias)] == (1.0, 0.0) and by_param[id(head[2].weight)] == (1.0, 0.0)
    assert len(by_param) == sum(1 for _ in model.parameters())
    freeze_batch_norms(body)
    assert len({id(p) for g in decay_groups([model], body, 1.0, 0.1, 1e-4) for p in g["params"]}) == \
        len(by_param) - 2  # the BatchNorm's weight and bias leave the optimiser
    model.train()
    before = body[1].running_mean.clone()
    body(torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(body[1].running_mean, before) and not body[1].training  # statistics frozen despite train()
