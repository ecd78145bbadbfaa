"""Atomic file writes: a crash during a write never damages the previous file."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Iterator

import numpy as np
import torch


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on success flush, fsync and rename it onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; keep the old file's mode or follow the umask
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a power loss right after it keeps the new file)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save_torch(obj, path: str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_save_numpy(path: str, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (``path`` keeps its exact name)."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array)


def atomic_write_text(path: str, text: str) -> None:
    """Replace a text file atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
