"""The reference's freezing options through run.py: what they freeze stays bit-identical to the previous step."""
from __future__ import annotations

import pytest
import torch

from conftest import smoke_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def step0(synthetic_voc, tmp_path_factory):
    import run

    out = tmp_path_factory.mktemp("freeze_step0")
    assert run.main(smoke_args(synthetic_voc, out, extra=["--lr", "0.01", "--overlap"])) == 0
    return str(out / "ckpt" / "15-5-voc_Experiment_0.pth")


def _groups(state):
    """Parameter/buffer names by part: body, head, old classifier (cls.0), new classifier (cls.1)."""
    return {"body": [k for k in state if k.startswith("body.")], "head": [k for k in state if k.startswith("head.")],
            "old_cls": [k for k in state if k.startswith("cls.0.")], "new_cls": [k for k in state if k.startswith("cls.1.")]}


def _changed(before, after, keys, *, stats: bool):
    chosen = [k for k in keys if ("running_" in k) == stats]
    return any(not torch.equal(before[k], after[k]) for k in chosen)


@pytest.mark.parametrize("flag, frozen, trained", [
    ("--freeze", ["body"], ["head", "old_cls"]),
    ("--freeze_old", ["old_cls"], ["body", "head"]),
    ("--freeze_old_and_FE", ["body", "old_cls"], ["head"]),
    ("--freeze_all_but_new", ["body", "head", "old_cls"], []),
])
def test_freezing_flags(synthetic_voc, tmp_path, step0, flag, frozen, trained):
    import run

    args = smoke_args(synthetic_voc, tmp_path, steps=(1,), extra=["--lr", "0.01", "--overlap", "--method", "FT",
                                                                   "--step_ckpt", step0, flag, "--fix_bn"])
    assert run.main(args) == 0
    before = torch.load(step0, weights_only=True)["model_state"]
    after = torch.load(tmp_path / "ckpt" / "15-5-voc_Experiment_1.pth", weights_only=True)["model_state"]
    parts = _groups(after)
    for part in frozen:
        assert not _changed(before, after, parts[part], stats=False), f"{flag} changed {part}"
    for part in trained:
        assert _changed(before, after, parts[part], stats=False), f"{flag} did not train {part}"
    # FT: no classifier init touches the old classifier. --fix_bn: running statistics stay frozen although the model is put in training mode every epoch
    assert not _changed(before, after, parts["body"] + parts["head"], stats=True)


def test_lr_old_gives_old_classifiers_their_own_rate():
    from segmentation_module import make_model
    from experiment.config import parse_config
    from utils.optim import build_param_groups

    model = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 2])
    cfg = parse_config(["--lr_old", "0.1"])
    groups = build_param_groups(model, cfg, 0.01, step=1)
    old = {id(p) for p in model.cls[0].parameters()}
    old_group = [g for g in groups if {id(p) for p in g["params"]} == old]
    assert len(old_group) == 1 and old_group[0]["lr"] == pytest.approx(0.001)
