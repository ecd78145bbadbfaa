"""An exclusive lock per experiment, so two runs cannot write the same checkpoints and results.

The lock is ``fcntl.flock`` on ``{folder}/.{name}.lock``: the kernel releases it when its process ends, however it
ends, so a lock left by a killed run is simply free again (its file stays, with the last holder's details). A run
that ends normally removes the file (and the folder, if it created it and nothing else is there), checking after
taking the lock that the file it locked is still the one at the path.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket

from utils.errors import UserError

log = logging.getLogger(__name__)


class RunLock:
    """``with RunLock(folder, name):`` holds the lock; a second holder gets a one-line ``UserError``. ``label``: how
    the message names what is locked (default ``--name {name}``)."""

    def __init__(self, folder: str, name: str, what: str = "run", label: str | None = None):
        self.path = os.path.join(folder, f".{name}.lock")
        self.label, self.what = label or f"--name {name}", what
        self.handle = None

    def __enter__(self) -> "RunLock":
        folder = os.path.dirname(self.path) or "."
        self.created = _missing_folders(folder)  # removed again on exit when still empty
        os.makedirs(folder, exist_ok=True)
        for _ in range(10):  # the holder may remove the file between our open and our lock: open it again
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                raise UserError(f"another {self.what} is using {self.label} in {folder} ({holder}); wait for it "
                                "to end, or give this run another --name or --checkpoint") from None
            if _same_file(handle, self.path):
                break
            handle.close()
        else:  # pragma: no cover - ten races in a row
            raise UserError(f"cannot take the lock {self.path}: it keeps being replaced; retry")
        handle.seek(0)
        left = handle.read().strip()
        if left:  # the file of a holder that ended without removing it (killed, or restarted by torchrun)
            log.info("%s: took over the lock of %s, which ended without releasing it (killed or restarted)",
                     self.path, _holder(left))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding the lock: a newcomer then locks a fresh file
            for folder in self.created:  # deepest first; rmdir fails (and stops) on a folder with files
                os.rmdir(folder)
        with contextlib.suppress(OSError):
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    out, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        out.append(folder)
        folder = os.path.dirname(folder)
    return out


def _same_file(handle, path: str) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"PID {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
