"""Rank-0 logging, TensorBoard scalars and progress bars."""
from __future__ import annotations

import logging
import os
import sys

from utils.dist import get_rank, is_main_process


def setup_logging(debug: bool = False) -> None:
    """One stdout handler of ours on the root logger, replaced on each call (the rank is known only after the
    process group starts). Handlers others installed (pytest's, a user's) are left in place."""
    level = logging.INFO if is_main_process() else logging.WARNING
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_ciss", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._ciss = True
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{get_rank()} %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug and is_main_process() else level)


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


def progress(iterable, *, enabled: bool, desc: str, total: int | None = None):
    """tqdm on rank 0 in an interactive terminal, the bare iterable elsewhere."""
    if enabled and is_main_process() and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return iterable
