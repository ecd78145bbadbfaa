"""Rank-0 logging, TensorBoard scalars and progress bars."""
from __future__ import annotations

import logging
import os
import sys

from utils.dist import get_rank, is_main_process


def setup_logging(debug: bool = False) -> None:
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if debug and is_main_process() else level,
                        format=f"%(asctime)s rank{get_rank()} %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


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
