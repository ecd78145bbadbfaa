"""Named methods = default values of term flags (behaviour.md 1.17, PLOP/AWT ``modify_command_options``).

Applied by the config parser with ``parser.set_defaults(**PRESETS[name])``, so an explicit flag beats the preset.
Values are PLOP/AWT's (EWC/RW/PI ``reg_importance`` 100; the MiB repository used 500 for EWC and PI).
``--loss_kd`` defaults to 0 (PLOP/MiB), not AWT's 10, so FT, LWF-MC, EWC, RW, PI and PLOP get no hidden KD term;
pass ``--loss_kd 10`` to reproduce AWT's runs of those methods. ``init_balanced`` is defined by ``methods/awt.py``.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "FT": {},
    "LWF": {"loss_kd": 100},
    "LWF-MC": {"icarl": True, "icarl_importance": 10},
    "ILT": {"loss_kd": 100, "loss_de": 100},
    "EWC": {"regularizer": "ewc", "reg_importance": 100},
    "RW": {"regularizer": "rw", "reg_importance": 100},
    "PI": {"regularizer": "pi", "reg_importance": 100},
    "MiB": {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True},
    "PLOP": {
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}},
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    },
}

METHOD_NAMES: tuple[str, ...] = tuple(PRESETS)


def method_name(value: str) -> str:
    """argparse ``type`` for ``--method``: exact names, plus case-insensitive spellings (``MIB`` -> ``MiB``).

    The reference accepted only the exact spelling although its README writes ``MIB``.
    """
    for name in METHOD_NAMES:
        if value.lower() == name.lower():
            return name
    return value  # argparse then reports the invalid choice with the list of valid names
