"""Every --method preset runs two steps through run.py, and again with AWT on top (--att 25 --mask_att).

The released AWT code crashed at step 1 for every preset but MiB and PLOP (behaviour.md 8.1 #1).
"""
from __future__ import annotations

import csv
import math
import os

import pytest

from conftest import smoke_args

pytestmark = pytest.mark.slow

PRESET_NAMES = ["FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP"]


def _rows(out, name):
    with open(os.path.join(out, "results", f"test_voc_15-5_{name}.csv")) as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("presets")


@pytest.mark.parametrize("method", PRESET_NAMES)
def test_preset_runs_two_steps_then_with_awt(synthetic_voc, out, method):
    import run

    args = smoke_args(synthetic_voc, out, steps=(0, 1),
                      extra=["--method", method, "--name", method, "--lr", "0.01", "0.001", "--overlap"])
    assert run.main(args) == 0  # a non-finite loss would exit 2
    rows = _rows(out, method)
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(math.isfinite(float(c)) for c in rows[1][1:] if c not in ("x", "X"))

    step0 = os.path.join(out, "ckpt", f"15-5-voc_{method}_0.pth")
    awt_args = smoke_args(synthetic_voc, out, steps=(1,),
                          extra=["--method", method, "--name", f"{method}_AWT", "--lr", "0.001", "--overlap",
                                 "--att", "25", "--mask_att", "--step_ckpt", step0])
    assert run.main(awt_args) == 0
    masks = list((out / "channels" / f"15-5-voc_{method}_AWT").glob("step1_union_att25_*[0-9a-f].pt"))
    assert len(masks) == 1
    assert [r[0] for r in _rows(out, f"{method}_AWT")] == ["1"]
