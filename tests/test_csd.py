"""CSD's parts and IRN's first stage against explicit computations on hand-made tensors; the three-stage pipeline
(wsss.py train_cam / make_cam / make_masks, then run.py on the masks) on synthetic VOC, killed and resumed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import interrupt_at_epoch
from weaksup import csd
from weaksup.cam import CAMNet, multiscale_cams, poly_lr
from weaksup.masks import confident_mask, confusion, labels_from_cams, miou


def test_domain_split_and_cooccurrence():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    sources, targets = csd.domain_split(y)
    assert sources.tolist() == [0, 4] and targets.tolist() == [1, 3, 5]
    m = csd.cooccurrence(y, targets)
    assert m.tolist() == [[0, 2, 1], [2, 0, 2], [1, 2, 0]]


def test_sources_are_drawn_by_cooccurrence():
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0]])
    sources, targets = csd.domain_split(y)
    sampler = csd.SourceSampler(y, csd.cooccurrence(y, targets), sources)
    # a target with class 0: M[0] = [0, 2, 1] -> P = (0, 2/3, 1/3)
    assert np.allclose(sampler.class_probabilities(np.array([1, 0, 0])), [0, 2 / 3, 1 / 3])
    rng = np.random.default_rng(0)
    draws = [sampler.draw(np.array([1, 0, 0]), rng) for _ in range(3000)]
    counts = np.bincount([c for c, _ in draws], minlength=3)
    expected = np.array([0, 2000, 1000])
    chi2 = ((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum()
    assert counts[0] == 0 and chi2 < 10.8  # chi-square, 1 degree of freedom, p = 0.001
    assert all(y[s].sum() == 1 and y[s, c] == 1 for c, s in draws)  # a single-label image of the drawn class
    assert {s for c, s in draws if c == 1} == {1, 6}  # uniform among the class's sources: both appear


def test_composites_take_pasted_pixels_from_the_source_mask_and_the_rest_from_the_target():
    stride = 4
    target = torch.zeros(3, 16, 16)
    source = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) + 1  # every pixel distinct, > 0
    fg = torch.zeros(16, 16, dtype=torch.bool)
    fg[5:9, 6:11] = True
    fg[6, 6] = False  # a hole: alpha, not the box
    bg = torch.zeros(16, 16, dtype=torch.bool)
    bg[:, :3] = True
    for seed in range(20):
        out = csd.composites(target, source, fg, bg, stride=stride, rng=np.random.default_rng(seed))
        for key, alpha in (("fg", fg), ("bg", bg)):
            image, where, (dy, dx) = out[key], out[f"{key}_where"], out[f"{key}_from"]
            assert dy % stride == 0 and dx % stride == 0
            ys, xs = where.nonzero(as_tuple=True)
            assert torch.equal(image[:, ys, xs], source[:, ys - dy, xs - dx])  # pasted = source at the shift
            assert alpha[ys - dy, xs - dx].all()  # only pixels of the source's mask
            assert (image[:, ~where] == 0).all()  # everything else is the target
        assert int(out["fg_where"].sum()) == int(fg.sum())  # the whole foreground fits in this target


def test_kl_terms_and_distributions_equal_explicit_computations():
    torch.manual_seed(0)
    cams = torch.rand(2, 3, 4, 4)
    p = csd.cam_distribution(cams)
    bg = 1 - cams.amax(1, keepdim=True)
    assert torch.allclose(p, torch.softmax(torch.cat([bg, cams], 1), 1))
    p_s, p_c = p[0], p[1]
    where = torch.zeros(4, 4, dtype=torch.bool)
    where[2, 1] = where[3, 3] = True
    shift = (1, 1)  # composite cell (2, 1) <- source cell (1, 0); (3, 3) <- (2, 2)
    expected = 0.0
    for (y, x) in ((2, 1), (3, 3)):
        t, s = p_s[:, y - 1, x - 1], p_c[:, y, x]
        expected += float((t * (t.log() - s.log())).sum()) / 2
    assert math.isclose(float(csd.shifted_kl(p_s, p_c, where, shift)), expected, rel_tol=1e-6)
    student = p_c.clone().requires_grad_(True)
    teacher = p_s.clone().requires_grad_(True)
    csd.shifted_kl(teacher, student, where, shift).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the single-label source is the teacher
    assert float(csd.shifted_kl(p_s, p_c, torch.zeros(4, 4, dtype=torch.bool), shift)) == 0
    cell = csd.cells(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]).bool(), 2)
    assert cell.tolist() == [[True, False], [False, True]]  # 3/4, 0/4, 0/4 and 2/4 (half counts) pasted
    assert csd.cells(torch.tensor([[1, 0], [0, 0]]).bool(), 2).tolist() == [[False]]


def test_seeds_and_confident_masks_follow_irn():
    cams = np.array([[[0.9, 0.2, 0.04], [0.0, 0.5, 0.1]], [[0.1, 0.25, 0.01], [0.6, 0.0, 0.02]]], np.float32)
    keys = np.array([3, 7])
    assert labels_from_cams(cams, keys, 0.15).tolist() == [[3, 7, 0], [7, 3, 0]]
    # fg where a class beats 0.30; bg where none beats 0.05; 255 between
    assert confident_mask(cams, keys).tolist() == [[3, 255, 0], [7, 3, 255]]
    conf = confusion(np.array([[1, 1], [0, 2]]), np.array([[1, 0], [0, 255]]), 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    value, iou = miou(conf)
    assert iou[:2] == [0.5, 0.5] and math.isnan(iou[2]) and value == 0.5


def test_multiscale_cams_are_irn_s_sum_of_flipped_pairs_normalised():
    from models.tv_resnet import build_tv_backbone
    torch.manual_seed(0)
    net = CAMNet(build_tv_backbone("tv_resnet18", 16), 4).eval()
    image = torch.randn(3, 40, 24)
    out = multiscale_cams(net, image, torch.tensor([1, 3]), scales=(1.0,))
    with torch.no_grad():
        maps = torch.relu(torch.nn.functional.conv2d(net.features(torch.stack([image, image.flip(-1)])),
                                                     net.classifier.weight))
        cam = maps[0] + maps[1].flip(-1)
        cam = torch.nn.functional.interpolate(cam[None], size=(48, 32), mode="bilinear", align_corners=False)[0]
        cam = cam[[1, 3], :40, :24]
        cam = cam / (cam.flatten(1).amax(1)[:, None, None] + 1e-5)
    assert out.shape == (2, 40, 24) and torch.allclose(out, cam, atol=1e-6)
    assert not any(p.requires_grad for p in net.body.layer1.parameters()) and net.classifier.weight.requires_grad
    net.train()
    assert not net.body.bn1.training  # IRN keeps the statistics


def test_poly_schedule_is_irn_s():
    assert poly_lr(0.1, 0, 10) == 0.1
    assert math.isclose(poly_lr(0.1, 5, 10), 0.1 * 0.5 ** 0.9)
    assert poly_lr(0.1, 12, 10) == poly_lr(0.1, 9, 10)


# ------------------------------------------------------------------------------------------------ the pipeline
def _stop_at_call(monkeypatch, module, name: str, n: int):
    """Make ``module.name`` raise KeyboardInterrupt at its ``n``-th call (Ctrl-C in a stage); returns the original."""
    real, calls = getattr(module, name), [0]

    def stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stop)
    return real


@pytest.mark.slow
def test_three_stages_end_to_end_killed_and_resumed(tmp_path, monkeypatch, caplog, capsys):
    import wsss
    from dataset.synthetic import generate
    from report import main as report_main
    from weaksup import pipeline

    data = tmp_path / "voc"
    generate(str(data), "voc", size=40, n_train=48, n_val=20, seed=3)
    common = ["--dataset", "voc", "--data_root", str(data), "--cache_root", str(tmp_path / "cache"), "--backbone",
              "tv_resnet18", "--no_pretrained", "--batch_size", "8", "--crop_size", "40", "--resize_long", "36",
              "48", "--scales", "1.0", "0.5", "--epochs", "6"]

    def stage(name, out, extra=()):
        return wsss.main([name, "--out", str(out), *common, *extra])

    # stage 1, killed after 2 epochs, continues to the same weights as an uninterrupted run
    assert stage("train_cam", tmp_path / "full") == 0
    original = pipeline.Meter.finish
    def interrupt_after_two_epochs(self):
        original(self)
        if self.what.startswith("train_cam epoch 3/"):
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Meter, "finish", interrupt_after_two_epochs)
    assert stage("train_cam", tmp_path / "irn") == 130
    assert (tmp_path / "irn" / "cam_net.pth.partial").exists() and not (tmp_path / "irn" / "cam_net.pth").exists()
    monkeypatch.setattr(pipeline.Meter, "finish", original)
    assert stage("train_cam", tmp_path / "irn") == 0
    a = torch.load(tmp_path / "full" / "cam_net.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "irn" / "cam_net.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # stage 2, killed after some images: the files written stay, the rest are made
    real = _stop_at_call(monkeypatch, pipeline, "multiscale_cams", 11)
    assert stage("make_cam", tmp_path / "irn") == 130
    assert len(list((tmp_path / "irn" / "cams").glob("*.npz"))) == 10
    monkeypatch.setattr(pipeline, "multiscale_cams", real)
    assert stage("make_cam", tmp_path / "irn") == 0
    assert len(list((tmp_path / "irn" / "cams").glob("*.npz"))) == 48

    # stage 3: masks and the measurements, killed after some images; the rerun writes the rest and measures all
    real_mask = _stop_at_call(monkeypatch, pipeline, "confident_mask", 6)
    assert stage("make_masks", tmp_path / "irn") == 130
    assert len(list((tmp_path / "irn" / "masks").glob("*.png"))) == 5 and not (tmp_path / "irn" / "wsss.json").exists()
    monkeypatch.setattr(pipeline, "confident_mask", real_mask)
    assert stage("make_masks", tmp_path / "irn") == 0
    result = json.loads((tmp_path / "irn" / "wsss.json").read_text())
    assert 0 < result["seed_miou"] <= 100 and 0 < result["mask_miou"] <= 100 and len(result["seed_iou"]) == 21
    masks = sorted((tmp_path / "irn" / "masks").glob("*.png"))
    assert len(masks) == 48
    seg = ["--backbone", "resnet18", "--no_pretrained", "--norm_act", "abn", "--crop_size", "40", "--batch_size", "2",
           "--epochs", "2", "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "seg"),
           "--name", "irn", "--date", "test"]
    seen = []
    from dataset import base
    real_pair = base.load_pair

    def spy(img, lbl, *args, **kwargs):
        seen.append(lbl)
        return real_pair(img, lbl, *args, **kwargs)

    monkeypatch.setattr(base, "load_pair", spy)
    train_seg = ["train_seg", "--dataset", "voc", "--data_root", str(data), "--out", str(tmp_path / "irn"),
                 "--cache_root", str(tmp_path / "cache"), "--", *seg]
    import train
    original = interrupt_at_epoch(monkeypatch, 1)  # stage 4 killed after its first epoch, continued by run.py
    assert wsss.main(train_seg) == 130
    assert "seg_miou" not in json.loads((tmp_path / "irn" / "wsss.json").read_text())
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert wsss.main(train_seg) == 0
    trained_on = {p for p in seen if "masks" in p}
    assert trained_on and trained_on <= {str(m) for m in masks}  # the training labels are the pseudo-masks
    result = json.loads((tmp_path / "irn" / "wsss.json").read_text())
    assert 0 <= result["seg_miou"] <= 100 and result["seg_results"].endswith("test_voc_offline_irn.csv")
    capsys.readouterr()
    assert report_main(["--wsss", str(tmp_path / "irn")]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert [c.strip() for c in row[2:6]] == [f"{result[k]:.1f}" for k in ("seed_miou", "mask_miou", "mask_coverage",
                                                                           "seg_miou")]

    # CSD on stage 1 with the baseline's masks: both KL terms act
    with caplog.at_level("INFO"):
        assert stage("train_cam", tmp_path / "csd", ["--csd", "--csd_masks", str(tmp_path / "irn" / "masks"),
                                                     "--epochs", "1"]) == 0
    assert (tmp_path / "csd" / "cam_net.pth").exists()
    line = next(r.getMessage() for r in caplog.records if "csd_fg=" in r.getMessage())
    values = dict(part.split("=") for part in line.split(": ", 1)[1].split())
    assert float(values["csd_fg"]) > 0 and float(values["csd_bg"]) > 0
