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

from dataset.tasks import DATASET_DEFAULTS
from experiment.argparser import get_argparser
from methods import METHODS
from methods.options import check_flag_owners
from methods.stack import default_method, resolve_plugins
from models import BACKBONES
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
    if known.method is None and _given(parser, argv, "weakly"):
        known.method = default_method(True)  # its preset applies, as with --method
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
    method, extensions = resolve_plugins(cfg)
    superseded = {name for ext in extensions if ext.transfer_plan(cfg, method) is not None for name in ext.supersedes}
    labels = [method.name] + [ext.label(cfg, method) for ext in extensions if ext.name not in superseded]
    return "+".join(label for label in labels if label)


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations the command line sets explicitly (abbreviations and ``--flag=value`` included): argparse
    fills defaults only for attributes the namespace lacks, so every attribute still holding the sentinel was not
    given."""
    sentinel = object()
    ns = argparse.Namespace(**{a.dest: sentinel for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_known_args(list(argv), namespace=ns)
    return {dest for dest, value in vars(ns).items() if value is not sentinel}


def _resolve_outputs(ns: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    if getattr(ns, "output_dir", None):
        for dest, sub in OUTPUT_FOLDERS.items():
            if hasattr(ns, dest) and not _given(parser, argv, dest):
                setattr(ns, dest, os.path.join(ns.output_dir, sub))
    if hasattr(ns, "cache_root") and ns.cache_root is None:
        ns.cache_root = default_cache_root(ns.data_root)
    if getattr(ns, "output_stride", 0) is None and getattr(ns, "backbone", None) in BACKBONES:
        ns.output_stride = BACKBONES[ns.backbone].default_stride


def parse_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None, *,
                 warn: bool = True, notes: list[str] | None = None):
    """Parse the command line; ``--method`` presets become parser defaults, so explicit flags win. Derived
    defaults: output folders under ``--output_dir``, the cache folder, ``--name``. Warnings (a flag the method
    ignores, an explicit flag overriding the preset) go to ``notes`` when given, for an entry point to log once its
    logging is set up, else to the log now; ``warn=False``: none (parsing a published recipe's flags to compare
    them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or get_argparser()
    method, dataset = _method_from_argv(parser, argv)
    defaults = {a.dest: a.default for a in parser._actions}
    data_preset = DATASET_DEFAULTS.get(dataset, {})
    preset = {**data_preset, **(METHODS[method].preset_for(dataset) if method is not None else {})}
    parser.set_defaults(**preset)
    given = given_dests(parser, argv)
    preset_set = {k for k, v in preset.items() if k not in given and v != defaults.get(k)}
    # flags of plugins that are off are refused before the strict parse, so that their values cannot hide the reason
    said = check_flag_owners(parser, parser.parse_known_args(argv)[0], given | preset_set, preset_set=preset_set)
    ns = parser.parse_args(argv)
    said += [f"--{key} {getattr(ns, key)} overrides the {method} preset value {value}" if key not in data_preset
             else f"--{key} {getattr(ns, key)} overrides --dataset {dataset}'s {value} (the reference forced it: a "
                  "recipe difference)"
             for key, value in preset.items() if key in given and getattr(ns, key) != value]
    if warn and notes is not None:
        notes.extend(said)
    elif warn:
        for line in said:
            log.warning("%s", line)
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
