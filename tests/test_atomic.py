"""Atomic writes: a write interrupted at any point (exception, failing rename, SIGKILL) leaves the previous file intact,
for checkpoints, result CSV rows, AWT channel masks and index caches."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT
from utils import io as uio


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


class Boom(RuntimeError):
    pass


@pytest.fixture
def failing_replace(monkeypatch):
    """``os.replace`` fails: everything was written to the temporary file, the rename never happens."""
    def replace(src, dst):
        raise Boom("disk full at rename")

    monkeypatch.setattr(uio.os, "replace", replace)


# ----------------------------------------------------------------------------------------------- atomic_write itself
def test_exception_inside_the_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(Boom):
        with uio.atomic_write(str(path)) as handle:
            handle.write(b"new " * 1000)
            raise Boom
    assert path.read_bytes() == b"old contents" and _leftovers(tmp_path) == []


def test_failing_rename_keeps_the_old_file(tmp_path, failing_replace):
    path = tmp_path / "f.txt"
    path.write_text("old\n")
    with pytest.raises(Boom):
        uio.atomic_write_text(str(path), "new\n")
    assert path.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_success_replaces_and_keeps_permissions(tmp_path):
    path = tmp_path / "f.txt"
    uio.atomic_write_text(str(path), "one\n")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(path, 0o640)
    uio.atomic_write_text(str(path), "two\n")
    assert path.read_text() == "two\n" and path.stat().st_mode & 0o777 == 0o640 and _leftovers(tmp_path) == []


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from utils import io as uio
    path, where = sys.argv[1], sys.argv[2]
    if where == "before_rename":  # everything written and flushed, the rename not yet done
        real_fsync = os.fsync
        def slow_fsync(fd):
            real_fsync(fd)
            print("ready", flush=True)
            time.sleep(120)
        uio.os.fsync = slow_fsync
    with uio.atomic_write(path, "wb") as handle:
        handle.write(b"N" * 3_000_000)
        if where == "mid_write":
            handle.flush()
            print("ready", flush=True)
            time.sleep(120)
        handle.write(b"N" * 3_000_000)
""")


@pytest.mark.parametrize("where", ["mid_write", "before_rename"])
def test_sigkill_during_a_write_keeps_the_old_file(tmp_path, where):
    path = tmp_path / "ckpt.pth"
    old = os.urandom(100_000)
    path.write_bytes(old)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(path), where], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == old  # the half-written data lives only in a temporary file next to it


# ----------------------------------------------------------------------------------------------- each kind of file
def test_checkpoint_save_failing_mid_pickle_keeps_the_old_checkpoint(tmp_path):
    from utils.checkpoint import safe_load, save_checkpoint

    path = str(tmp_path / "step.pth")
    save_checkpoint(path, epoch=1, model_state={"w": torch.ones(3)})
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails after writing part of the file
        save_checkpoint(path, epoch=2, model_state={"w": torch.zeros(100_000)}, bad=lambda: None)
    ckpt = safe_load(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model_state"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_checkpoint_save_failing_rename(tmp_path, failing_replace):
    from utils.checkpoint import safe_load, save_checkpoint

    path = str(tmp_path / "step.partial.pth")
    with open(path, "wb") as handle:
        torch.save({"epoch": 1}, handle)
    with pytest.raises(Boom):
        save_checkpoint(path, epoch=2, model_state={"w": torch.zeros(10)})
    assert safe_load(path)["epoch"] == 1


def test_csv_row_upsert_interrupted_keeps_the_old_rows(tmp_path, failing_replace, monkeypatch):
    from metrics.results import upsert_row

    path = tmp_path / "r.csv"
    path.write_text("0,0.5,x,0.5\n")
    with pytest.raises(Boom):
        upsert_row(str(path), 1, "1,0.4,0.3,0.35")
    assert path.read_text() == "0,0.5,x,0.5\n" and _leftovers(tmp_path) == []


def test_csv_row_upsert_replaces_the_row_of_a_rerun(tmp_path):
    from metrics.results import upsert_row

    path = tmp_path / "r.csv"
    upsert_row(str(path), 1, "1,0.4,0.3,0.35")
    upsert_row(str(path), 0, "0,0.5,x,0.5")
    upsert_row(str(path), 1, "1,0.6,0.2,0.4")
    assert path.read_text() == "0,0.5,x,0.5\n1,0.6,0.2,0.4\n"


def test_channel_mask_write_interrupted_keeps_the_old_mask(tmp_path, failing_replace):
    from methods.awt import load_mask, write_mask

    path = tmp_path / "masks" / "step1_union.pt"
    path.parent.mkdir()
    old = torch.zeros(256, dtype=torch.bool)
    old[:64] = True
    with open(path, "wb") as handle:
        torch.save(old, handle)
    with pytest.raises(Boom):
        write_mask(str(path), torch.ones(256, dtype=torch.bool))
    assert torch.equal(load_mask(str(path), 256), old) and _leftovers(path.parent) == []


def test_index_cache_write_interrupted_keeps_the_old_cache(tmp_path, monkeypatch):
    path = tmp_path / "train-0.npy"
    np.save(path, np.arange(5, dtype=np.int64))

    def half_save(handle, array):  # writes part of the array, then the process "fails"
        handle.write(b"\x93NUMPY partial")
        raise Boom("interrupted")

    monkeypatch.setattr(uio.np, "save", half_save)
    with pytest.raises(Boom):
        uio.atomic_save_numpy(str(path), np.arange(7, dtype=np.int64))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    assert _leftovers(tmp_path) == []


def test_dataset_index_cache_goes_through_atomic_writes(tmp_path, monkeypatch):
    """IncrementalSegmentation writes its caches with atomic_save_numpy: a failing rename leaves no cache at all
    (never a truncated one), and the next build recomputes it."""
    import dataset.incremental as inc
    from dataset import build_datasets
    from dataset.synthetic import generate

    root = tmp_path / "voc"
    generate(str(root), "voc", size=16, n_train=20, n_val=20, seed=0)
    kwargs = dict(dataset="voc", root=str(root), task="15-5", step=0, overlap=False, crop_size=16,
                  cache_root=str(tmp_path / "cache"))
    real = uio.os.replace
    monkeypatch.setattr(uio.os, "replace", lambda s, d: (_ for _ in ()).throw(Boom("rename failed")))
    inc._PRESENCE_MEMO.clear()
    with pytest.raises(Boom):
        build_datasets(**kwargs)
    monkeypatch.setattr(uio.os, "replace", real)
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert not [f for f in cached if f.endswith(".npy")]  # nothing half written, no temporary left
    assert not [f for f in cached if f.endswith(".tmp")]
    inc._PRESENCE_MEMO.clear()
    train, _, _ = build_datasets(**kwargs)
    assert len(train) > 0
