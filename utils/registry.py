"""Named registries filled by decorators in the parts' own files (backbones, heads, classifiers, metrics...).

A ``Registry`` is a dict from name to entry whose ``register`` decorator refuses a name twice and whose ``get``
answers an unknown name with one line listing the registered ones.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from utils.errors import UserError

T = TypeVar("T")


class Registry(dict):
    """``{name: entry}``; ``kind`` names the entries in messages (e.g. "head")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: store the decorated object under ``name``."""
        def add(entry: T) -> T:
            self.add(name, entry)
            return entry
        return add

    def add(self, name: str, entry) -> None:
        if not name:
            raise ValueError(f"a {self.kind} needs a name")
        if name in self:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self[name] = entry

    def get_entry(self, name: str, flag: str | None = None):
        """The entry of ``name``; ``UserError`` naming the choices (and ``flag``, the option that chose it)."""
        if name not in self:
            what = flag or self.kind
            raise UserError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(self)) or '(none registered)'}")
        return self[name]
