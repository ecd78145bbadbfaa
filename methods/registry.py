"""The registries of the methods package: loss terms, methods (``--method NAME``) and extensions (composable
plugins switched on by their own flags, e.g. AWT). Terms run in their declared ``order`` (:func:`ordered_terms`),
never in import order; extensions compose in registration order."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

TERMS: dict[str, type] = {}
METHODS: dict[str, type] = {}
EXTENSIONS: dict[str, type] = {}


def _register(table: dict, kind: str, cls: type) -> type:
    if not cls.name:
        raise ValueError(f"{kind} {cls.__name__} has no name")
    if cls.name in table:
        raise ValueError(f"{kind} {cls.name!r} registered twice")
    table[cls.name] = cls
    return cls


def ordered_terms() -> list[type]:
    """The registered loss terms in execution order (``LossTerm.order``; ties: registration order)."""
    return sorted(TERMS.values(), key=lambda cls: cls.order)


def register_term(cls: type) -> type:
    """Class decorator: add a ``LossTerm`` to ``TERMS`` under ``cls.name``."""
    return _register(TERMS, "loss term", cls)


def register_method(cls: type) -> type:
    """Class decorator: add a ``Method`` to ``METHODS`` (selectable with ``--method cls.name``)."""
    return _register(METHODS, "method", cls)


def register_extension(cls: type) -> type:
    """Class decorator: add an ``Extension`` to ``EXTENSIONS`` (active when ``cls.enabled(cfg)``)."""
    return _register(EXTENSIONS, "extension", cls)


class PresetView(Mapping):
    """``{method name: preset}`` read live from ``METHODS`` (the flag defaults ``--method NAME`` applies)."""

    def __getitem__(self, name: str) -> dict:
        return METHODS[name].preset

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return repr(dict(self))


PRESETS = PresetView()


def method_name(value: str) -> str:
    """argparse ``type`` for ``--method``: exact names, plus case-insensitive spellings (``MIB`` -> ``MiB``).

    The reference accepted only the exact spelling although its README writes ``MIB``."""
    for name in METHODS:
        if value.lower() == name.lower():
            return name
    return value  # argparse then reports the invalid choice with the list of valid names
