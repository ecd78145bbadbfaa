"""What every command line of the framework shares: help prefixes for reference flags that do nothing here, and
an ``ArgumentParser`` whose errors are one line."""
from __future__ import annotations

import argparse
import math

IGNORED = "(ignored: dead flag in the reference code, accepted so published command lines run) "
NOT_IMPLEMENTED = "(not implemented: rejected unless left at the default) "


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block of ~150 flags would bury the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


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


def plain_name(text: str) -> str:
    """argparse type: a name used in file names (no path separator, no '..', not empty)."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or ".." in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name (no '/', '\\' or '..'): it names files")
    return text
