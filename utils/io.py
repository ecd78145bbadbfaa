"""Atomic file writes: a crash during a write never damages the previous file."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import shutil
import socket
import tempfile
from typing import Iterator

import numpy as np
import torch

from utils.errors import UserError

log = logging.getLogger(__name__)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


class DiskFull(UserError):
    """A write failed for lack of space (or a quota / file-size limit); the previous file is intact."""


def free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown free space"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def _out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILURES)


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _temp_prefix(path: str) -> str:
    """``.{name}.{host tag}.`` : the temporary files of ``path`` written on this host (the tag keeps them apart from
    another node's on a shared folder, where a process id means nothing)."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
    return f".{os.path.basename(path)}.{host}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or an absurd number: leave its file alone
    return True


def remove_stale_temporaries(path: str) -> int:
    """Remove the temporary files a killed write of ``path`` left on this host (their writer's process is gone);
    returns the bytes freed. A kill during a checkpoint save otherwise leaves a hidden file as large as the model."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), _temp_prefix(path)
    freed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            pid = name[len(prefix):].split(".", 1)[0]
            if not (name.startswith(prefix) and name.endswith(".tmp") and pid.isdigit()) or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                stale = os.path.join(folder, name)
                size = os.path.getsize(stale)
                os.unlink(stale)
                freed += size
                log.info("removed %s (%.1f MB), left by an interrupted write of %s", stale, size / 2**20, path)
    return freed


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on success flush, fsync and rename it onto ``path``. Temporary
    files of earlier writes of ``path`` killed before their rename are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        if exc.errno in _FULL:
            raise DiskFull(f"cannot write {path}: no space left in {folder} ({free_space(folder)}); free space or "
                           "choose another folder") from exc
        raise UserError(f"cannot write {path} ({exc.strerror}): choose a writable folder") from exc
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; keep the old file's mode or follow the umask
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _out_of_space(exc):
            raise DiskFull(f"cannot write {path}: no space left in {folder} ({free_space(folder)}; "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else 'write failed'}); "
                           "the previous file is kept: free space or choose another folder") from exc
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
