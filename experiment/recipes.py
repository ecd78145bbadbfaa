"""The training recipes of the wrapper scripts (``scripts/recipes.toml``): which published script each wrapper
mirrors, with its learning rates, epochs, batch and flags.

    python -m experiment.recipes shell DATASET SETTING METHOD    # bash assignments, read by scripts/run_setting.sh
    python -m experiment.recipes list                            # one line per (dataset, setting, method)

``match(cfg)`` finds the recipe a run.py configuration follows (run.py warns when its lr or batch differ from it).
"""
from __future__ import annotations

import os
import shlex
import sys
import tomllib
from dataclasses import dataclass
from functools import lru_cache

from dataset.tasks import canonical_task, num_steps
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES_FILE = os.path.join(ROOT, "scripts", "recipes.toml")
SETTING_ALIASES = {("ade", "50-50"): "50"}  # file-name setting -> task name, where they differ


@dataclass(frozen=True)
class Recipe:
    """The recipe of one wrapper ``scripts/{dataset}/{method}_{setting}.sh``."""

    id: str
    paper: str
    dataset: str
    setting: str  # as in the wrapper's file name
    method: str  # the wrapper's method name (MiB_AWT, PLOP, ...)
    source: str  # published script, "" when none exists
    note: str
    lr: tuple[float, float]  # step 0, later steps
    epochs: tuple[int, int]
    batch: int  # effective batch
    flags: tuple[str, ...]
    later_flags: tuple[str, ...]
    crop: int = 512  # training crop and evaluation centre crop (SSUL: 513)
    first_flags: tuple[str, ...] = ()  # added at step 0 only (WILSON's BCE step 0)
    backbone: str = "resnet101"
    protocols: tuple[str, ...] = ("overlap", "disjoint")  # the first one is run_setting.sh's default

    @property
    def task(self) -> str:
        return canonical_task(self.dataset, SETTING_ALIASES.get((self.dataset, self.setting), self.setting))

    @property
    def published(self) -> bool:
        return bool(self.source)

    def lr_at(self, step: int) -> float:
        return self.lr[0] if step == 0 else self.lr[1]

    def epochs_at(self, step: int) -> int:
        return self.epochs[0] if step == 0 else self.epochs[1]

    def flags_at(self, step: int) -> tuple[str, ...]:
        return self.flags + (self.later_flags if step > 0 else self.first_flags)

    def describe(self) -> str:
        where = self.source or f"no published script ({self.note})"
        return f"{self.paper} recipe {self.id}: {where}"


def _rows(path: str) -> list[dict]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle).get("recipe", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read the recipe table {path} ({exc})") from exc


@lru_cache(maxsize=None)
def load_recipes(path: str = RECIPES_FILE) -> dict[tuple[str, str, str], Recipe]:
    """``{(dataset, setting, method): Recipe}``; a (dataset, setting, method) in two rows is an error."""
    table: dict[tuple[str, str, str], Recipe] = {}
    for row in _rows(path):
        missing = {"id", "paper", "dataset", "methods", "settings", "source", "lr", "epochs", "batch", "flags"} - set(row)
        if missing or (not row["source"] and not row.get("note")):
            raise UserError(f"{path}: recipe {row.get('id')!r} lacks {sorted(missing) or ['note']}")
        for method in row["methods"]:
            for setting in row["settings"]:
                key = (row["dataset"], setting, method)
                if key in table:
                    raise UserError(f"{path}: {key} is in recipes {table[key].id!r} and {row['id']!r}")
                table[key] = Recipe(
                    id=row["id"], paper=row["paper"], dataset=row["dataset"], setting=setting, method=method,
                    source=row["source"].replace("{setting}", setting), note=row.get("note", ""),
                    lr=(float(row["lr"][0]), float(row["lr"][1])), epochs=(int(row["epochs"][0]), int(row["epochs"][1])),
                    batch=int(row["batch"]),
                    flags=tuple(f.replace("{method}", method).replace("{base}", method.removesuffix("_AWT"))
                                for f in row["flags"]),
                    later_flags=tuple(row.get("later_flags", ())), crop=int(row.get("crop", 512)),
                    first_flags=tuple(row.get("first_flags", ())), backbone=row.get("backbone", "resnet101"),
                    protocols=tuple(row.get("protocols", ("overlap", "disjoint"))))
    return table


def get(dataset: str, setting: str, method: str) -> Recipe:
    table = load_recipes()
    if (dataset, setting, method) not in table:
        known = sorted({m for d, s, m in table if d == dataset and s == setting})
        hint = f"methods with a recipe here: {', '.join(known)}" if known else "no recipe for this setting"
        raise UserError(f"no recipe for {method} on {dataset} {setting} in scripts/recipes.toml ({hint}); add a row "
                        "or pass the values yourself (LR0, LR, EPOCHS0, EPOCHS)")
    return table[(dataset, setting, method)]


def match(cfg, parse) -> Recipe | None:
    """The recipe ``cfg`` (a run.py config) follows: among the recipes of its dataset and task, those whose flags,
    parsed by ``parse(argv) -> config``, give the same values as ``cfg`` for every flag they set; the one setting the
    most flags wins (``--method MiB --att 25 --mask_att`` follows AWT's recipe, ``--method MiB`` MiB's)."""
    best, best_size = None, -1
    for recipe in load_recipes().values():
        if recipe.dataset != cfg.dataset or recipe.task != canonical_task(cfg.dataset, cfg.task):
            continue
        parsed = parse(list(recipe.flags) + ["--dataset", cfg.dataset, "--task", cfg.task])
        dests = _explicit_dests(recipe.flags)
        if all(getattr(parsed, d) == getattr(cfg, d) for d in dests) and len(dests) > best_size:
            best, best_size = recipe, len(dests)
    return best


def _explicit_dests(flags: tuple[str, ...]) -> list[str]:
    return [f[2:].replace("-", "_") for f in flags if f.startswith("--")]


def shell(recipe: Recipe) -> str:
    """Bash assignments for scripts/run_setting.sh."""
    values = {"RECIPE_ID": recipe.id, "RECIPE_SOURCE": recipe.source or "none", "RECIPE_NOTE": recipe.note,
              "RECIPE_TASK": recipe.task, "RECIPE_STEPS": str(num_steps(recipe.dataset, recipe.task)),
              "RECIPE_LR0": repr(recipe.lr[0]), "RECIPE_LR": repr(recipe.lr[1]),
              "RECIPE_EPOCHS0": str(recipe.epochs[0]), "RECIPE_EPOCHS": str(recipe.epochs[1]),
              "RECIPE_BATCH": str(recipe.batch), "RECIPE_CROP": str(recipe.crop), "RECIPE_BACKBONE": recipe.backbone,
              "RECIPE_OVERLAP": "1" if recipe.protocols[0] == "overlap" else "0",
              "RECIPE_PROTOCOLS": " ".join(recipe.protocols)}
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    lines.append("RECIPE_FLAGS=(" + " ".join(shlex.quote(f) for f in recipe.flags) + ")")
    lines.append("RECIPE_LATER_FLAGS=(" + " ".join(shlex.quote(f) for f in recipe.later_flags) + ")")
    lines.append("RECIPE_FIRST_FLAGS=(" + " ".join(shlex.quote(f) for f in recipe.first_flags) + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 4 and argv[0] == "shell":
            print(shell(get(*argv[1:])))
            return 0
        if argv == ["list"]:
            for (dataset, setting, method), r in sorted(load_recipes().items()):
                print(f"{dataset:18s} {setting:8s} {method:9s} lr {r.lr[0]:g}/{r.lr[1]:g} epochs {r.epochs[0]}/"
                      f"{r.epochs[1]} batch {r.batch} {' '.join(r.flags)} | {r.source or 'no script: ' + r.note}")
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m experiment.recipes shell DATASET SETTING METHOD | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
