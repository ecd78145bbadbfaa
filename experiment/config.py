"""A frozen configuration built once from the command line.

``Config`` is a frozen dataclass whose fields are the parser's destinations, so every reference flag is an
attribute and nothing can change it mid-run: per-step values (step, lr) are passed as arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from typing import Sequence

from experiment.argparser import get_argparser
from methods import PRESETS
from utils.errors import UserError
from utils.flags import ArgumentParser

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _config_class(dests: tuple[str, ...]):
    return dataclasses.make_dataclass("Config", [(d, object) for d in dests], frozen=True)


def config_from_namespace(ns: argparse.Namespace):
    """Freeze a parsed namespace into a ``Config``."""
    values = dict(vars(ns))
    cls = _config_class(tuple(sorted(values)))
    return cls(**values)


def replace(cfg, **changes):
    """A copy of ``cfg`` with some fields changed (configs are never mutated)."""
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    """The resolved configuration as sorted JSON (logged at start and stored in checkpoints)."""
    return json.dumps(to_dict(cfg), sort_keys=True, default=str)


def _method_from_argv(parser: argparse.ArgumentParser, argv: Sequence[str]):
    pre = ArgumentParser(add_help=False)
    method_action = next(a for a in parser._actions if a.dest == "method")
    pre.add_argument("--method", type=method_action.type, choices=method_action.choices, default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.method


def _given(parser: argparse.ArgumentParser, argv: Sequence[str], dest: str) -> bool:
    """Whether the flag writing ``dest`` appears explicitly on the command line."""
    options = [o for a in parser._actions if a.dest == dest for o in a.option_strings]
    return any(tok == o or tok.startswith(o + "=") for tok in argv for o in options)


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """Parse the command line; ``--method`` presets become parser defaults, so explicit flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or get_argparser()
    method = _method_from_argv(parser, argv)
    if method is not None:
        preset = PRESETS[method]
        parser.set_defaults(**preset)
    ns = parser.parse_args(argv)
    if method is not None:
        for key, value in preset.items():
            if _given(parser, argv, key) and getattr(ns, key) != value:
                log.warning("--%s %s overrides the %s preset value %s", key, getattr(ns, key), method, value)
    return config_from_namespace(ns)


def step_lrs(cfg) -> list[tuple[int, float]]:
    """Pairs (step, lr): one lr per step, or a single lr for every step (the reference's rule)."""
    steps, lrs = list(cfg.step), list(cfg.lr)
    if len(lrs) == 1:
        lrs = lrs * len(steps)
    if len(lrs) != len(steps):
        raise UserError(f"--lr has {len(lrs)} values but --step has {len(steps)}: give one lr per step or a single lr")
    return list(zip(steps, lrs))


# Flags that do not change the trained weights (paths, logging, workers, which steps the call runs); a resumed step
# may differ in them. Every other flag must match the interrupted run for the resume to be exact.
_RESUME_FREE_FLAGS = frozenset({
    "num_workers", "no_progress", "debug", "visualize", "logdir", "print_interval", "ckpt_interval", "val_interval",
    "resume", "no_auto_resume", "ckpt", "step", "lr", "overwrite", "date", "results_dir", "checkpoint", "local_rank",
    "sample_num", "code_directory", "cache_root", "channels_dir", "data_root", "step_ckpt", "test", "device",
    "compile", "att_plot"})


def check_resume_config(ckpt: Any, cfg, path: str) -> None:
    """Refuse to resume from an in-step checkpoint written with different training flags (e.g. --batch_size)."""
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, str):
        return  # reference checkpoints carry no configuration
    try:
        saved = json.loads(stored)
    except ValueError:
        return
    current = json.loads(json.dumps(to_dict(cfg), sort_keys=True, default=str))
    diff = [k for k in sorted(set(saved) & set(current))  # flags added by a newer version are not compared
            if k not in _RESUME_FREE_FLAGS and saved[k] != current[k]]
    if diff:
        shown = ", ".join(f"--{k} {saved[k]!r} there, {current[k]!r} now" for k in diff[:3])
        raise UserError(f"in-step checkpoint {path} was written with other settings ({shown}); rerun with the same "
                        "flags to resume, or pass --no_auto_resume to start the step over")
