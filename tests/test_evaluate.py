"""evaluate.py: a trained step checkpoint evaluated on a split, at full resolution, with PNG panels."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import smoke_args

pytestmark = pytest.mark.slow


def test_evaluate_writes_metrics_and_pictures(synthetic_voc, tmp_path, capsys):
    import evaluate
    import run

    args = smoke_args(synthetic_voc, tmp_path, extra=["--lr", "0.01"])
    assert run.main(args) == 0
    out = tmp_path / "eval"
    assert evaluate.main([*args, "--crop_val", "--out_dir", str(out), "--save_samples", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["full_resolution"] is True and metrics["step"] == 0
    assert 0.0 <= metrics["mIoU"] <= 1.0
    panels = sorted(out.glob("sample_*.png"))
    assert len(panels) == 3
    picture = np.asarray(Image.open(panels[0]))
    assert picture.shape[1] == 3 * picture.shape[0]  # image | ground truth | prediction
    assert "mIoU" in capsys.readouterr().out


def test_evaluate_missing_checkpoint_is_one_line_error(synthetic_voc, tmp_path, capsys):
    import evaluate

    assert evaluate.main(smoke_args(synthetic_voc, tmp_path, extra=["--step", "0"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step checkpoint not found") and "Traceback" not in err
