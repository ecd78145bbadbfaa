"""What every command line of the framework shares: help prefixes for reference flags that do nothing here, and
an ``ArgumentParser`` whose errors are one line."""
from __future__ import annotations

import argparse
import copy
import math

IGNORED = "(ignored: dead flag in the reference code, accepted so published command lines run) "
NOT_IMPLEMENTED = "(not implemented: rejected unless left at the default) "
# Reference flags whose name says the opposite of what passing them does (store_false): kept for published
# command lines, marked in --help.
INVERTED = "[inverted reference flag] "

_SECTIONS = (("(ignored", "reference flags accepted and ignored (they did nothing in the reference either)"),
             ("(not implemented", "reference flags not implemented here (an error unless left at the default)"))


# Requirement tags a flag may declare (``declare(..., requires=...)``); methods.options resolves them for a run.
DEFAULT_PARAM_GROUPS = "default_param_groups"  # read only by the default parameter groups (Method.param_groups)
CLASS_INCREMENTAL = "class_incremental"  # acts on the classes a step adds: meaningless when steps add domains
TRANSFER_INIT = "transfer_init"  # MiB's initialisation of the new classifier (methods that do not own the init)
WITH_TRANSFER = "with_transfer"  # acts on an extension's transfer into the new classifier (AWT's): refused without


def declare(action: argparse.Action, *, requires: str | tuple[str, ...] = (),
            resume_free: bool = False) -> argparse.Action:
    """Attach what the framework needs to know about a flag where it is defined: the requirement tags under which it
    means something (refused otherwise, see ``methods.options``) and whether it leaves the trained weights unchanged
    (``resume_free``: paths, logging, workers; an interrupted step may be resumed with another value)."""
    action.ciss_requires = (requires,) if isinstance(requires, str) else tuple(requires)
    action.ciss_resume_free = bool(resume_free)
    return action


def mark(group: argparse._ActionsContainer, *, resume_free: tuple[str, ...] = (),
         requires: dict[str, str] | None = None) -> None:
    """:func:`declare` for flags of ``group`` named by destination (right after the group's definitions)."""
    actions = {a.dest: a for a in getattr(group, "_group_actions", None) or group._actions}
    for dest in resume_free:
        declare(actions[dest], requires=requirements(actions[dest]), resume_free=True)
    for dest, tag in (requires or {}).items():
        declare(actions[dest], requires=tag, resume_free=getattr(actions[dest], "ciss_resume_free", False))


def requirements(action: argparse.Action) -> tuple[str, ...]:
    return getattr(action, "ciss_requires", ())


def resume_free_dests(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The destinations of the flags declared ``resume_free``."""
    return frozenset(a.dest for a in parser._actions if getattr(a, "ciss_resume_free", False))


def flag_name(action: argparse.Action) -> str:
    """The flag as users write it: the first long option string."""
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


class HelpFormatter(argparse.HelpFormatter):
    """Defaults shown after each help text (unless the text already gives one); wide enough for the long names."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=118)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """A description with line breaks is kept as written (module docstrings with examples); one without is
        reflowed."""
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        quiet = (default is None or default is False or default == [] or default is argparse.SUPPRESS
                 or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                        argparse._HelpAction, argparse._VersionAction))
                 or "default" in text.lower() or not action.option_strings)
        return text if quiet else f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block of ~150 flags would bury the message) and a readable
    ``--help``: ``usage`` short unless given, defaults shown, and the reference flags that are ignored or not
    implemented moved out of their groups into two sections at the end."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")

    def _get_value(self, action: argparse.Action, arg_string: str):
        """Every number flag, whatever its declared type, refuses nan and inf: no loss weight, threshold or rate
        of this framework means anything there, and a nan would pass every range check silently."""
        value = super()._get_value(action, arg_string)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentError(action, f"{arg_string!r} is not a finite number")
        return value

    def format_help(self) -> str:
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        moved: dict[str, list[argparse.Action]] = {title: [] for _, title in _SECTIONS}
        for group in self._action_groups:
            kept = []
            for action in group._group_actions:
                section = _section_of(action)
                (moved[section] if section else kept).append(action)
            if not kept:
                continue
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(kept)
            formatter.end_section()
        for title, actions in moved.items():
            if actions:
                formatter.start_section(title)
                formatter.add_arguments([_without_prefix(a) for a in actions])
                formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


def _without_prefix(action: argparse.Action) -> argparse.Action:
    """A copy whose help drops the generic prefix its section title already says."""
    for prefix in (IGNORED, NOT_IMPLEMENTED):
        if (action.help or "").startswith(prefix):
            action = copy.copy(action)
            action.help = action.help[len(prefix):].strip() or "-"
    return action


def _section_of(action: argparse.Action) -> str | None:
    text = (action.help or "").lower()
    return next((title for prefix, title in _SECTIONS if text.startswith(prefix)), None)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, factors)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def momentum_value(text: str) -> float:
    """argparse type: SGD momentum in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def iterations_or_auto(text: str) -> int | str:
    """argparse type: ``auto`` or an iteration count >= 0."""
    return "auto" if text == "auto" else nonnegative_int(text)


# Bytes a name may take: the longest file name built from it (``.{task}-{dataset}_{name}_{step}.partial.pth`` and
# the temporary file of its atomic save) must stay under the 255 bytes most file systems allow.
NAME_MAX_BYTES = 100


def plain_name(text: str) -> str:
    """argparse type: a name used in file names (no path separator, no '..', no control character, not empty, at
    most ``NAME_MAX_BYTES`` bytes in UTF-8)."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or ".." in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name (no '/', '\\' or '..'): it names files")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} holds a control character (newline, tab, ...): it names files "
                                         "and log lines; use letters, digits, '-', '_', '+' or '.'")
    if len(text.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}... is {len(text.encode('utf-8', 'surrogateescape'))} "
                                         f"bytes long; a name may take {NAME_MAX_BYTES} (file names built from it "
                                         "must stay under 255)")
    return text


def date_name(text: str) -> str:
    """argparse type of ``--date``: empty (today) or a plain name (it prefixes the results file names)."""
    return text if text == "" else plain_name(text)


def named_path(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=PATH`` (``--data_roots coco=/data/coco``)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. coco=/data/coco), got {text!r}")
    return name.strip(), path_value(path)


def path_value(text: str) -> str:
    """argparse type: a file or folder path, not empty (an empty path would silently mean the current folder or
    nothing at all), without control characters."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder; give a path (e.g. '.' for here)")
    if any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} holds a control character (newline, tab, ...)")
    return text
