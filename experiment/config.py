"""A frozen configuration built once from the command line.

``Config`` is a frozen dataclass whose fields are the parser's destinations, so every reference flag is an
attribute and nothing can change it mid-run: per-step values (step, lr) are passed as arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from typing import Sequence

from experiment.argparser import get_argparser
from methods import METHODS, build_method
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


def _method_from_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(``--method``, ``--dataset``) as given, before the full parse (the preset depends on both)."""
    pre = ArgumentParser(add_help=False)
    for dest in ("method", "dataset"):
        action = next(a for a in parser._actions if a.dest == dest)
        pre.add_argument(*action.option_strings, dest=dest, type=action.type, choices=action.choices,
                         default=None if dest == "method" else action.default)
    known, _ = pre.parse_known_args(list(argv))
    return known.method, known.dataset


def _given(parser: argparse.ArgumentParser, argv: Sequence[str], dest: str) -> bool:
    """Whether the flag writing ``dest`` appears explicitly on the command line."""
    options = [o for a in parser._actions if a.dest == dest for o in a.option_strings]
    return any(tok == o or tok.startswith(o + "=") for tok in argv for o in options)


# Where --output_dir puts each output; a flag given explicitly keeps its own path (reference command lines).
OUTPUT_FOLDERS = {"checkpoint": "checkpoints", "results_dir": "results", "logdir": "logs", "channels_dir": "channels"}


def user_cache_dir() -> str:
    """``$CISS_CACHE_DIR``, else ``$XDG_CACHE_HOME/ciss``, else ``~/.cache/ciss``."""
    if os.environ.get("CISS_CACHE_DIR"):
        return os.environ["CISS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ciss")


def default_cache_root(data_root: str) -> str:
    """One cache folder per data root, so that two datasets of one layout never share index files."""
    root = os.path.abspath(data_root)
    tag = hashlib.sha1(root.encode()).hexdigest()[:10]
    return os.path.join(user_cache_dir(), f"{os.path.basename(root.rstrip(os.sep)) or 'data'}-{tag}")


def default_name(cfg) -> str:
    """``--name`` when not given: the method and its extensions, e.g. ``MiB+AWT`` (``FT`` without --method)."""
    stack = build_method(cfg)
    labels = [stack.method.name] + [p.label(cfg) for p in stack.plugins[1:]]
    return "+".join(label for label in labels if label)


def _resolve_outputs(ns: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    if getattr(ns, "output_dir", None):
        for dest, sub in OUTPUT_FOLDERS.items():
            if hasattr(ns, dest) and not _given(parser, argv, dest):
                setattr(ns, dest, os.path.join(ns.output_dir, sub))
    if hasattr(ns, "cache_root") and ns.cache_root is None:
        ns.cache_root = default_cache_root(ns.data_root)


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None, *,
                 warn: bool = True):
    """Parse the command line; ``--method`` presets become parser defaults, so explicit flags win. Derived
    defaults: output folders under ``--output_dir``, the cache folder, ``--name``. ``warn=False``: no log lines
    (parsing a published recipe's flags to compare them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or get_argparser()
    method, dataset = _method_from_argv(parser, argv)
    if method is not None:
        preset = METHODS[method].preset_for(dataset)
        parser.set_defaults(**preset)
    ns = parser.parse_args(argv)
    if method is not None and warn:
        for key, value in preset.items():
            if _given(parser, argv, key) and getattr(ns, key) != value:
                log.warning("--%s %s overrides the %s preset value %s", key, getattr(ns, key), method, value)
    _resolve_outputs(ns, parser, argv)
    cfg = config_from_namespace(ns)
    if getattr(cfg, "name", "") is None:
        cfg = replace(cfg, name=default_name(cfg))
    return cfg


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
    "compile", "att_plot", "output_dir"})


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
