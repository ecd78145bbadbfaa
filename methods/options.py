"""One rule for every flag a plugin owns: a flag used while its owner is not active is refused with one line naming
the owner (``error: --pckd_weights belongs to --method RCIL ...``). No plugin keeps a list of other plugins' flags.

A flag is *used* when the command line gives it or the ``--method`` preset sets it to another value than the
parser's default. Its owner is recorded where it is declared (``methods.criterion._owned_group``):

* a method's flags need that method (or one inheriting its flags: SSUL's serve SSUL-M);
* an extension's flags need it enabled, except its ``switches`` (the flags that enable it);
* a loss term's flags need a method that builds the registered terms (``Capabilities.builds_terms``).

Flags may also declare requirement tags (``utils.flags.declare``): ``default_param_groups`` (the method trains with
the default parameter groups), ``class_incremental`` (the dataset's steps add classes), ``transfer_init`` (the
method lets MiB's/AWT's transfer initialise the new classifier) and ``with_transfer`` (an extension transfers into
the new classifier: AWT with --att). A method's ``ignored_flags`` (reference flags its
published scripts pass without effect) are accepted with a warning.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable

from dataset.tasks import is_domain_incremental
from methods.base import INIT_BY_TRANSFER, Extension, LossTerm, Method
from methods.registry import EXTENSIONS, METHODS
from methods.stack import resolve_init_plan, resolve_plugins
from utils.errors import UserError
from utils.flags import (CLASS_INCREMENTAL, DEFAULT_PARAM_GROUPS, TRANSFER_INIT, WITH_TRANSFER, flag_name,
                         requirements)

def _method_names(owner: type[Method]) -> str:
    names = [name for name, cls in METHODS.items() if issubclass(cls, owner)]
    return " or ".join(names) or owner.name


def _owner_problem(action: argparse.Action, method: type[Method], extensions: list[type[Extension]]) -> str | None:
    """Why the owner of ``action`` is not active in this run, or None when it is (or the flag has no owner)."""
    owner = getattr(action, "ciss_owner", None)
    if owner is None:
        return None
    flag = flag_name(action)
    if isinstance(owner, type) and issubclass(owner, Extension):
        if owner in extensions or action.dest in owner.switches:
            return None
        return f"{flag} belongs to {owner.name}, which is off in this run: turn it on with {owner.switch_hint()}"
    if isinstance(owner, type) and issubclass(owner, LossTerm):
        if method.capabilities.builds_terms:
            return None
        return (f"{flag} belongs to the {owner.name} loss term, which --method {method.name} does not use (it trains "
                "with its own losses)")
    if issubclass(method, owner):
        return None
    return f"{flag} belongs to --method {_method_names(owner)} (this run: --method {method.name})"


def _transfer_missing(cfg: Any, method: type[Method], extensions: list[type[Extension]]) -> str | None:
    if resolve_init_plan(cfg, method, extensions).transfer is not None:
        return None
    makers = [e for e in EXTENSIONS.values() if e.transfer_hint]
    names = " or ".join(e.name for e in makers) or "an extension"
    hints = "; ".join(e.transfer_hint for e in makers)
    return f"acts on {names}'s transfer into the new classifier, which this run does not make (add {hints})"


# requirement tag -> (cfg, method class, extension classes) -> why the run does not meet it, or None
REQUIREMENTS: dict[str, Callable[[Any, type[Method], list[type[Extension]]], str | None]] = {
    DEFAULT_PARAM_GROUPS: lambda cfg, m, exts: None if m.capabilities.default_param_groups else (
        f"acts on the default parameter groups, which --method {m.name} replaces with its own"),
    TRANSFER_INIT: lambda cfg, m, exts: None if m.capabilities.classifier_init == INIT_BY_TRANSFER else (
        f"asks for MiB's initialisation of the new classifier, but --method {m.name} initialises it itself"),
    CLASS_INCREMENTAL: lambda cfg, m, exts: None if not is_domain_incremental(cfg.dataset) else (
        f"works on the classes a step adds, but {cfg.dataset} adds cities and keeps its 19 classes; use --method FT "
        "with --pod/--loss_kd as the published domain-incremental scripts do (scripts/cityscapes_domain/)"),
    WITH_TRANSFER: _transfer_missing,
}


def check_flag_owners(parser: argparse.ArgumentParser, cfg: Any, used: Iterable[str], *,
                      preset_set: Iterable[str] = ()) -> list[str]:
    """Refuse (``UserError``, one line) the first used flag whose owner is off or whose requirement the run does not
    meet, naming the other flags refused for the same reason. Returns the warnings about the method's
    ``ignored_flags`` for the caller to log. ``preset_set``: the used flags that only the preset set."""
    method, extensions = resolve_plugins(cfg)
    used, preset_set = set(used), set(preset_set)
    refused: list[tuple[str, str, str]] = []  # (flag, origin, problem)
    warnings: list[str] = []
    for action in parser._actions:
        if action.dest not in used or not action.option_strings:
            continue
        if action.dest in method.ignored_flags:  # accepted whatever its owner, as the published scripts pass it
            warnings.append(f"{flag_name(action)} has no effect with --method {method.name}: "
                            f"{method.ignored_flags[action.dest]}")
            continue
        origin = f" (set by --method {method.name})" if action.dest in preset_set else ""
        problems = [_owner_problem(action, method, extensions)]
        problems += [REQUIREMENTS[tag](cfg, method, extensions) for tag in requirements(action)]
        problems = [p for p in problems if p]
        if not problems:
            continue
        refused.append((flag_name(action), origin, problems[0]))
    if not refused:
        return warnings
    flag, origin, problem = refused[0]
    also = [f for f, _, p in refused[1:] if p.replace(f, flag, 1) == problem]
    suffix = f" (the same for {', '.join(also)})" if also else ""
    if problem.startswith(flag + " "):
        raise UserError(flag + origin + problem[len(flag):] + suffix)
    raise UserError(f"{flag}{origin} {problem}{suffix}")
