"""Rank-0 logging, TensorBoard scalars and progress bars."""
from __future__ import annotations

import logging
import os
import sys

from utils.dist import get_rank, is_main_process


_FORMAT = "%(asctime)s rank{rank} %(levelname)s %(message)s"


class _TerminalOnly(logging.Filter):
    """Drops records marked ``file_only`` (progress lines while a tqdm bar already shows the progress)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(debug: bool = False) -> None:
    """One stdout handler of ours on the root logger, replaced on each call (the rank is known only after the
    process group starts). Handlers others installed (pytest's, a user's) and our log file are left in place."""
    level = logging.INFO if is_main_process() else logging.WARNING
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_ciss", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._ciss = True
    handler.addFilter(_TerminalOnly())
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=get_rank()), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug and is_main_process() else level)


_SAID: set[str] = set()


def once(key: str) -> bool:
    """True the first time ``key`` is asked for in this call (``reset_once`` starts a call): notes and warnings
    about a run's deliberate settings are given once per run, not once per step."""
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


def reset_once() -> None:
    _SAID.clear()


def open_log_file(path: str) -> None:
    """Append every log line of this process (rank 0) to ``path`` too, with full dates; replaces a previous one."""
    close_log_file()
    if not is_main_process():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler._ciss_file = True
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=get_rank()), datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)


def log_file_path() -> str | None:
    handler = _file_handler()
    return handler.baseFilename if handler else None


def write_to_log_file(text: str) -> None:
    """A line for the log file only (the error line, already printed to stderr)."""
    handler = _file_handler()
    if handler is not None:
        handler.stream.write(text.rstrip("\n") + "\n")
        handler.flush()


def close_log_file() -> None:
    handler = _file_handler()
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _file_handler() -> logging.FileHandler | None:
    return next((h for h in logging.getLogger().handlers if getattr(h, "_ciss_file", False)), None)


class Board:
    """TensorBoard writer on rank 0 when enabled; a no-op elsewhere."""

    def __init__(self, logdir: str | None):
        self.writer = None
        if logdir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir)

    def scalar(self, tag: str, value: float, x: int) -> None:
        if self.writer:
            self.writer.add_scalar(tag, value, x)

    def text(self, tag: str, text: str, x: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, x)

    def image(self, tag: str, array_chw, x: int) -> None:
        if self.writer:
            self.writer.add_image(tag, array_chw, x)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def progress_bar(iterable, *, enabled: bool, desc: str, total: int | None = None):
    """tqdm on rank 0 in an interactive terminal, None elsewhere."""
    if enabled and is_main_process() and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return None
