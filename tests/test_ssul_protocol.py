"""SSUL's protocol, which its published numbers came from (issue 23, items 2-5): its augmentation, the test metric
that ignores classes not seen yet, the model selection every max(100, updates // 100) updates on the validation
images (flagged by the ledger when those are the test images), and the recipes that pass all of it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smoke_args
from dataset.transform import PaddedRandomCrop, RandomScale, ssul_train_preset


def test_ssul_augmentation_pads_every_side_with_background_then_crops():
    """SSUL's ExtRandomCrop(pad_if_needed): a short width pads every side by (1 + size - w) // 2, then a short
    height likewise (of the padded image), with 0 in image and label (background, not 255)."""
    image = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
    label = Image.fromarray(np.full((40, 60), 7, np.uint8))
    saliency = Image.fromarray(np.full((40, 60), 255, np.uint8))
    torch.manual_seed(0)
    for _ in range(8):
        img, (lab, sal) = PaddedRandomCrop(64)(image, (label, saliency))
        assert img.size == lab.size == sal.size == (64, 64)
        lab, sal, img = np.asarray(lab), np.asarray(sal), np.asarray(img)
        # width 60 -> pad 2 on every side (64 x 44), height 44 -> pad 10 (84 x 64): the data sit at x 12..72, y 12..52
        assert set(np.unique(lab)) <= {0, 7} and set(np.unique(sal)) <= {0, 255}
        rows = np.flatnonzero((lab == 7).any(axis=1))
        assert rows.min() == 12 and rows.max() == 51  # the crop spans the full padded height
        cols = np.flatnonzero((lab == 7).any(axis=0))  # a crop of x 0..84 starting at 0..20: x 12..72 in it
        assert 0 <= cols.min() <= 12 and 51 <= cols.max() <= 63 and len(cols) == cols.max() - cols.min() + 1
        assert (lab == 7).sum() == 40 * len(cols)
        assert ((lab == 7) == (img[..., 0] == 200)).all() and ((lab == 7) == (sal == 255)).all()
    scaled, scaled_label = RandomScale((2.0, 2.0))(image, label)
    assert scaled.size == scaled_label.size == (120, 80)
    out_img, out_label = ssul_train_preset(32)(image, label)
    assert out_img.shape == (3, 32, 32) and out_label.dtype == torch.uint8 and 255 not in out_label.unique()


def test_unseen_classes_are_ignored_in_the_intermediate_test_with_test_unseen_ignore(synthetic_voc, tmp_path):
    from dataset import build_datasets

    kw = dict(dataset="voc", root=synthetic_voc, task="15-1", step=1, overlap=True, crop_size=32,
              cache_root=str(tmp_path / "cache"))
    *_, as_background = build_datasets(**kw)
    *_, ignored = build_datasets(test_unseen="ignore", **kw)
    assert list(ignored.idxs) == list(as_background.idxs)  # the same images
    changed = 0
    for i in range(len(ignored)):
        bg, ig = as_background[i][1], ignored[i][1]
        raw = np.asarray(ignored.reader.load(int(ignored.idxs[i]))[1])
        unseen = torch.from_numpy(np.isin(raw, [17, 18, 19, 20]))  # classes of steps 2-5
        assert torch.equal(ig[unseen], torch.full_like(ig[unseen], 255)) and (bg[unseen] == 0).all()
        assert torch.equal(ig[~unseen], bg[~unseen])
        changed += int(unseen.sum())
    assert changed > 0


@pytest.mark.slow
def test_selection_every_n_updates_keeps_the_best_weights_and_the_ledger_flags_it(synthetic_voc, tmp_path, caplog):
    import json

    import run

    args = smoke_args(synthetic_voc, tmp_path, extra=["--method", "SSUL", "--epochs", "2", "--lr", "0.01",
                                                      "--select_best_on_val", "--val_every_iters", "3",
                                                      "--train_augment", "ssul", "--test_unseen", "ignore"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "validates every 3 optimiser updates" in text
    validations = [line for line in text.splitlines() if line.startswith("step 0 update ") and "validation" in line]
    assert validations and all(int(line.split()[3]) % 3 == 0 for line in validations)
    assert "keeping the weights of update " in text
    record = json.loads((tmp_path / "results" / "test_voc_15-5_Experiment.run.json").read_text())["steps"]["0"]
    assert record["selected_on"] == "the test images"
    assert run.selection_interval(type("C", (), {"select_best_on_val": True, "val_every_iters": "auto",
                                                 "epochs": 50})(), 331) == 165  # SSUL: max(100, 16550 // 100)
    assert run.selection_interval(type("C", (), {"select_best_on_val": True, "val_every_iters": "auto",
                                                 "epochs": 1})(), 20) == 100


def test_ssul_recipes_carry_ssul_protocol_flags():
    from experiment.recipes import load_recipes

    protocol = ["--select_best_on_val", "--val_every_iters", "auto", "--train_augment", "ssul", "--test_unseen",
                "ignore"]
    seen = set()
    for (dataset, _setting, method), recipe in load_recipes().items():
        base = method.replace("_AWT", "")
        if base not in ("SSUL", "SSUL-M") or dataset == "cityscapes":
            continue
        seen.add(method)
        flags = " ".join(recipe.flags)
        assert " ".join(protocol) in flags, recipe.id
        assert ("--ssul_memory_unshifted" in flags) == (base == "SSUL-M"), recipe.id
    assert seen == {"SSUL", "SSUL-M", "SSUL_AWT", "SSUL-M_AWT"}
