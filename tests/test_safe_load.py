"""Safe loading: checkpoints laid out like the reference's load through ``weights_only=True`` plus an explicit numpy
allow-list (numpy 1.x and 2.x names); anything else (class instances, ``os.system`` payloads) is refused with a
``UserError`` and never executed."""
from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np
import pytest
import torch

from conftest import smoke_args
from utils.checkpoint import model_state, safe_load
from utils.errors import UserError


class _Payload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Opaque:
    """A plain class instance (not on the allow-list)."""

    def __init__(self):
        self.value = 1


def _reference_checkpoint(model: torch.nn.Module | None = None) -> dict:
    """The keys and value types of a checkpoint saved by the reference run.py (DDP ``module.`` prefix, SGD state,
    PolyLR state, numpy best score, trainer_state with the regularizer)."""
    opt = None
    if model is None:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        model(torch.randn(2, 3, 4, 4)).sum().backward()
        opt.step()  # momentum buffers in the optimiser state
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return {"epoch": 30,
            "model_state": {"module." + k: v for k, v in model.state_dict().items()},
            "optimizer_state": opt.state_dict(),
            "scheduler_state": {"max_iters": 9000, "power": 0.9, "min_lr": 1e-6, "base_lrs": [0.01, 0.01],
                                "last_epoch": 9000, "_step_count": 9001, "verbose": False,
                                "_get_lr_called_within_step": False, "_last_lr": [1e-6, 1e-6]},
            "best_score": np.float64(0.6432),
            "trainer_state": {"regularizer": None}}


def _as_numpy1(path):
    """Rewrite a checkpoint as numpy 1.x writes it (``numpy.core.multiarray`` instead of ``numpy._core``)."""
    src = zipfile.ZipFile(path)
    entries = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    src.close()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries:
            if name.endswith("data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            dst.writestr(name, data)


@pytest.mark.parametrize("flavour", ["numpy2", "numpy1", "legacy_format"])
def test_reference_layout_loads(tmp_path, flavour):
    path = str(tmp_path / "ref.pth")
    ckpt = _reference_checkpoint()
    torch.save(ckpt, path, _use_new_zipfile_serialization=flavour != "legacy_format")
    if flavour == "numpy1":
        _as_numpy1(path)
        with zipfile.ZipFile(path) as z:
            assert b"cnumpy.core.multiarray\n" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    loaded = safe_load(path)
    assert loaded["epoch"] == 30 and float(loaded["best_score"]) == pytest.approx(0.6432)
    assert loaded["trainer_state"] == {"regularizer": None}
    assert loaded["scheduler_state"]["base_lrs"] == [0.01, 0.01]
    state = model_state(loaded, path)
    assert set(state) == {k[len("module."):] for k in ckpt["model_state"]}
    assert torch.equal(state["0.weight"], ckpt["model_state"]["module.0.weight"])
    torch.optim.SGD(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).parameters(),
                    lr=0.01, momentum=0.9).load_state_dict(loaded["optimizer_state"])


@pytest.mark.parametrize("bad", ["os_system", "class_instance", "namespace"])
def test_disallowed_objects_are_refused_and_never_run(tmp_path, bad):
    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil.pth")
    obj = {"os_system": _Payload(marker), "class_instance": _Opaque(), "namespace": argparse.Namespace(lr=0.01)}[bad]
    torch.save({"epoch": 1, "model_state": {"w": torch.ones(1)}, "extra": obj}, path)
    with pytest.raises(UserError) as info:
        safe_load(path, "previous-step checkpoint")
    message = str(info.value)
    assert "\n" not in message and path in message and "allow-list" in message and "not loaded" in message
    assert not marker.exists()


def test_damaged_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(_reference_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read"):
        safe_load(str(path))


def test_awt_mask_and_pretrained_files_refuse_payloads(tmp_path):
    from methods.awt import load_mask
    from segmentation_module import load_pretrained_body

    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil.pt")
    torch.save(_Payload(marker), path)
    with pytest.raises(UserError):
        load_mask(path, 256)
    with pytest.raises(UserError):
        load_pretrained_body(torch.nn.Conv2d(1, 1, 1), path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- through run.py
@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("safe_load_data") / "PascalVOC12"
    generate(str(root), "voc", size=32, n_train=40, n_val=20, seed=0)
    return str(root)


@pytest.mark.slow
def test_reference_checkpoint_as_previous_step(tiny_voc, tmp_path):
    """A step-0 checkpoint in the reference layout (numpy 1.x names) drives step 1 through --step_ckpt."""
    import run
    from experiment.builders import build_model
    from experiment.config import parse_config
    from methods.stack import build_method

    args0 = smoke_args(tiny_voc, tmp_path / "ref")
    cfg0 = parse_config(args0)
    model = build_model(cfg0, 0, method=build_method(cfg0), pretrained=False)
    ckpt = _reference_checkpoint(model)
    path = str(tmp_path / "15-5-voc_reference_0.pth")
    torch.save(ckpt, path)
    _as_numpy1(path)
    out = tmp_path / "out"
    args = smoke_args(tiny_voc, out, steps=(1,), extra=["--method", "MiB", "--step_ckpt", path, "--lr", "0.001",
                                                          "--batch_size", "4"])
    assert run.main(args) == 0
    new = torch.load(out / "ckpt" / "15-5-voc_Experiment_1.pth", weights_only=True)
    assert new["model_state"]["cls.1.weight"].shape[0] == 5
    assert not any(k.startswith("module.") for k in new["model_state"])


@pytest.mark.slow
def test_run_refuses_a_malicious_previous_step_checkpoint(tiny_voc, tmp_path, capsys):
    import run

    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil.pth")
    torch.save({"epoch": 1, "model_state": {"cls.0.weight": torch.ones(16, 256, 1, 1)}, "x": _Payload(marker)}, path)
    args = smoke_args(tiny_voc, tmp_path / "out", steps=(1,), extra=["--method", "MiB", "--step_ckpt", path])
    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert "error: previous-step checkpoint" in err and "allow-list" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_reference_checkpoint_with_batchnorm_counters_loads_without_strict_weights(tmp_path):
    """inplace-abn >= 1.1 writes ``num_batches_tracked`` for every ABN layer; our ABN has none. Such a checkpoint loads
    by default (counters ignored), while any other unexpected key is still refused."""
    from experiment.checkpoints import load_weights
    from segmentation_module import make_model
    from utils.errors import UserError

    torch.manual_seed(0)
    trained = make_model(backbone="resnet18", norm_act="iabn_sync", output_stride=16, classes=[16])
    state = trained.state_dict()
    norms = [k[: -len("running_mean")] for k in state if k.endswith("running_mean")]
    assert norms and not any(k.endswith("num_batches_tracked") for k in state)
    ckpt = _reference_checkpoint(trained)
    for prefix in norms:
        ckpt["model_state"][f"module.{prefix}num_batches_tracked"] = torch.tensor(9000)
    path = str(tmp_path / "15-5-voc_reference_0.pth")
    torch.save(ckpt, path)
    fresh = make_model(backbone="resnet18", norm_act="iabn_sync", output_stride=16, classes=[16])
    load_weights(fresh, path, what="previous-step checkpoint")
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    ckpt["model_state"]["module.body.extra.weight"] = torch.ones(1)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"unexpected 1 \(first body.extra.weight\)"):
        load_weights(make_model(backbone="resnet18", norm_act="iabn_sync", output_stride=16, classes=[16]), path,
                     what="previous-step checkpoint")
    # and the other way: a model with counters (--norm_act std) loads a checkpoint without them
    std = make_model(backbone="resnet18", norm_act="std", output_stride=16, classes=[16])
    torch.save({"model_state": {k: v for k, v in std.state_dict().items() if not k.endswith("num_batches_tracked")}},
               path)
    load_weights(make_model(backbone="resnet18", norm_act="std", output_stride=16, classes=[16]), path)
