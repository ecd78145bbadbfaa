"""AWT through run.py: the mask is computed, written and used; attribute.py + run.py gives the same mask and result."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import smoke_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def step0(synthetic_voc, tmp_path_factory):
    """A trained step-0 checkpoint of VOC 15-5 shared by the tests."""
    import run

    out = tmp_path_factory.mktemp("awt_step0")
    assert run.main(smoke_args(synthetic_voc, out, extra=["--method", "MiB", "--lr", "0.01", "--overlap"])) == 0
    return str(out / "ckpt" / "15-5-voc_Experiment_0.pth")


def _awt_args(data_root, out, step0, *extra):
    return smoke_args(data_root, out, steps=(1,), extra=["--method", "MiB", "--lr", "0.001", "--overlap",
                                                         "--att", "25", "--mask_att", "--step_ckpt", step0, *extra])


def test_run_computes_writes_and_uses_the_mask(synthetic_voc, tmp_path, step0, monkeypatch):
    import run
    from methods import awt
    from experiment.config import parse_config

    seen = {}
    original = awt.init_new_classifier

    def spy(model, **kwargs):
        seen.update(kwargs)
        return original(model, **kwargs)

    monkeypatch.setattr(awt, "init_new_classifier", spy)
    args = _awt_args(synthetic_voc, tmp_path, step0)
    assert run.main(args) == 0
    path = awt.channels_path(parse_config(args), 1)
    mask = torch.load(path, weights_only=True)
    assert mask.dtype == torch.bool and int(mask.sum()) == 64
    # the published AWT variant: random init + background weight on the selected channels, random bias
    assert torch.equal(seen["channel_mask"], mask)
    assert seen["orig_init"] is False and seen["copy"] is False and seen["copy_bias"] is False


def test_attribute_then_run_equals_run_alone(synthetic_voc, tmp_path, step0):
    import attribute
    import run
    from methods import awt
    from experiment.config import parse_config

    two, one = tmp_path / "two_commands", tmp_path / "one_command"
    args_two = _awt_args(synthetic_voc, two, step0)
    args_one = _awt_args(synthetic_voc, one, step0)
    assert attribute.main(args_two) == 0
    mask_path = awt.channels_path(parse_config(args_two), 1)
    written = torch.load(mask_path, weights_only=True)
    assert run.main(args_two) == 0  # loads the mask attribute.py wrote
    assert torch.equal(torch.load(mask_path, weights_only=True), written)
    assert run.main(args_one) == 0  # computes it itself
    assert torch.equal(torch.load(awt.channels_path(parse_config(args_one), 1), weights_only=True), written)
    csv_two = (two / "results" / "test_voc_15-5_Experiment.csv").read_text()
    csv_one = (one / "results" / "test_voc_15-5_Experiment.csv").read_text()
    assert csv_two == csv_one


def test_awt_without_usable_mask_stops_with_a_message(synthetic_voc, tmp_path, step0, capsys):
    """An existing mask of the wrong size is an error before training, never a silent random classifier."""
    import run
    from methods import awt
    from experiment.config import parse_config

    args = _awt_args(synthetic_voc, tmp_path, step0)
    path = awt.channels_path(parse_config(args), 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(torch.ones(100, dtype=torch.bool), path)
    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "mask" in err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
