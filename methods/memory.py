"""SSUL-M's exemplar memory: class-balanced selection of old images, the per-experiment memory file, and the feeder
that mixes memory samples into training batches (spec: SSUL's ``utils/memory.py`` and ``main.py``).

The memory of step t is chosen from the memory of step t-1 plus every training image of step t-1, each described
by the foreground classes it shows (ground truth of step t-1, with old classes pseudo-labelled by the step-(t-1)
model when t > 1). Selection: shuffle the candidates, shuffle the old classes, then round-robin over the classes
taking for each the first remaining candidate that shows it, until ``mem_size`` images are taken. Unlike upstream
(which loops forever), selection stops when a whole round adds nothing.

The file is ``{checkpoint}/{task}-{dataset}_{name}_memory.json`` (one per experiment; upstream wrote one file per
dataset that concurrent runs overwrote), written atomically::

    {"step_1": {"memory_candidates": [[image, n_objects, n_fg_pixels, [class, ...]], ...],
                "memory_list": [image, ...]}, ...}

``image`` is the image path relative to the dataset root, classes are model (remapped) indices.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from utils.data import seeded_rng
from utils.dist import barrier, is_main_process
from utils.errors import UserError
from utils.io import atomic_write_text

log = logging.getLogger(__name__)


def memory_path(checkpoint: str, task: str, dataset: str, name: str) -> str:
    return os.path.join(checkpoint, f"{task}-{dataset}_{name}_memory.json")


def select_balanced(candidates: Sequence[list], old_classes: Sequence[int], mem_size: int,
                    rng: np.random.Generator) -> list[list]:
    """Class-balanced selection (see the module docstring): candidates are ``[image, n_objs, n_fg, classes]``."""
    pool = [candidates[i] for i in rng.permutation(len(candidates))]
    order = [old_classes[i] for i in rng.permutation(len(old_classes))]
    taken: list[list] = []
    while len(taken) < mem_size:
        before = len(taken)
        for cls in order:
            hit = next((k for k, cand in enumerate(pool) if cls in cand[3]), None)
            if hit is not None:
                taken.append(pool.pop(hit))
            if len(taken) >= mem_size:
                break
        if len(taken) == before:  # no candidate shows any old class any more
            break
    return taken


def read_memory(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"memory file {path} cannot be read ({exc}); delete it to rebuild the memory") from None
    if not isinstance(data, dict):
        raise UserError(f"memory file {path} is not a JSON object; delete it to rebuild the memory")
    return data


def write_memory_step(path: str, step: int, selected: list[list], built_with: dict | None = None) -> dict:
    """Add (or replace) the entry of ``step``, keeping the others; written atomically. ``built_with``: the settings
    the selection depends on (``mem_size``, ``random_seed``), compared when the entry is read back."""
    data = read_memory(path)
    data[f"step_{step}"] = {"memory_candidates": selected, "memory_list": sorted(c[0] for c in selected),
                            **({"built_with": built_with} if built_with else {})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=0) + "\n")
    return data


def rebuild_reason(entry: dict | None, built_with: dict, overwrite: bool) -> str | None:
    """Why the memory entry of a step must be (re)built, or None to read it back: missing, built with other settings
    (another --mem_size or seed: the step starts over with the new ones), or ``--overwrite`` (the step is retrained,
    and with it what it derived from the earlier steps)."""
    if not entry or not entry.get("memory_list"):
        return "missing"
    if overwrite:
        return "--overwrite"
    saved = entry.get("built_with")
    if saved is None:
        return "written by an older version that did not record its --mem_size and seed"
    if saved != built_with:
        diff = ", ".join(f"{k} {saved.get(k)} there, {v} now" for k, v in built_with.items() if saved.get(k) != v)
        return f"it was built with other settings: {diff}"
    return None


def configured_size(cfg: Any, default: int, per_dataset: dict[str, int]) -> int:
    """--mem_size when given, else the method's default for the dataset (0: the method keeps no memory)."""
    if cfg.mem_size is not None:
        return int(cfg.mem_size)
    return per_dataset.get(cfg.dataset, default) if default else 0


def step_memory(cfg: Any, step: int, size: int, who: str, choose: Callable[[str], list[list]]) -> list[str]:
    """The memory list of ``step``: read back from the experiment's memory file, or (re)chosen by rank 0 with
    ``choose(path)`` (under its own seed, so the training after it draws the same numbers whether the memory was
    chosen in this call or in an earlier, interrupted one), written atomically, then read by every rank."""
    path = memory_path(cfg.checkpoint, cfg.task, cfg.dataset, cfg.name)
    key = f"step_{step}"
    built_with = {"mem_size": size, "random_seed": int(cfg.random_seed)}
    reason = rebuild_reason(read_memory(path).get(key), built_with, bool(cfg.overwrite))
    if is_main_process() and reason:
        if reason != "missing":
            log.info("%s step %d: rebuilding the memory in %s (%s)", who, step, path, reason)
        with seeded_rng(int(cfg.random_seed) * 1009 + step):
            selected = choose(path)
        write_memory_step(path, step, selected, built_with)
        log.info("%s step %d: memory of %d images written to %s", who, step, len(selected), path)
    barrier()
    entry = read_memory(path).get(key)
    if not entry or not entry.get("memory_list"):
        raise UserError(f"memory file {path} holds no memory for step {step}; delete it to rebuild")
    return list(entry["memory_list"])


def reader_indices(reader, images: Sequence[str]) -> list[int]:
    """The reader indices of memory images given relative to its root; a one-line error for one it lacks."""
    index = {os.path.relpath(img, reader.root): i for i, (img, _lbl) in enumerate(reader.samples)}
    missing = [img for img in images if img not in index]
    if missing:
        raise UserError(f"memory image {missing[0]} is not in the training split of {reader.root}; the memory file "
                        "belongs to other data: delete it to rebuild")
    return [index[img] for img in images]


class MemoryFeeder:
    """An endless stream of memory batches from ``loader`` (its sampler re-seeded per epoch, so that a resumed epoch
    draws the same batches): ``begin_epoch(e)`` then ``next()``."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch, self.round = 0, 0
        self._it: Iterator | None = None

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self.round = epoch, 0
        self._it = None

    def next(self):
        for _ in range(2):
            if self._it is None:
                self.loader.sampler.set_epoch(self.epoch * 1000 + self.round)
                self.round += 1
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise UserError("the exemplar memory holds fewer images than one batch")


def mix_rows(batch_size: int) -> torch.Tensor:
    """Rows of a batch replaced by memory samples: a random half (``torch.randperm``, as upstream)."""
    return torch.randperm(batch_size)[: batch_size // 2]
