"""The PLOP/MiB family as thin method plugins: each is the registered loss terms switched on by its preset
(behaviour.md 1.17, PLOP/AWT ``modify_command_options``).

Presets are applied by the config parser with ``parser.set_defaults(**PRESETS[name])``, so an explicit flag beats the
preset. Values are PLOP/AWT's (EWC/RW/PI ``reg_importance`` 100; the MiB repository used 500 for EWC and PI).
``--loss_kd`` defaults to 0 (PLOP/MiB), not AWT's 10, so FT, LWF-MC, EWC, RW, PI and PLOP get no hidden KD term;
pass ``--loss_kd 10`` to reproduce AWT's runs of those methods. ``init_balanced`` is the AWT extension's flag
(``methods/awt.py``): MiB's classifier initialisation.
"""
from __future__ import annotations

from methods.base import LossTerm, Method, StepContext
from methods.criterion import build_terms
from methods.registry import PRESETS, method_name, register_method

__all__ = ["PRESETS", "method_name", "TermMethod"]


class TermMethod(Method):
    """A method made of the registered loss terms its flags switch on; the model, data and schedule are the
    reference's."""

    def terms(self, ctx: StepContext) -> list[LossTerm]:
        return build_terms(self.cfg, ctx)


@register_method
class FT(TermMethod):
    """Fine-tuning: cross-entropy on the current step's labels."""
    name = "FT"


@register_method
class LwF(TermMethod):
    """LwF: output distillation of the old classes."""
    name, preset = "LWF", {"loss_kd": 100}


@register_method
class LwFMC(TermMethod):
    """LwF-MC / iCaRL: BCE with BCE distillation of the old classes."""
    name, preset = "LWF-MC", {"icarl": True, "icarl_importance": 10}


@register_method
class ILT(TermMethod):
    """ILT: output and feature distillation."""
    name, preset = "ILT", {"loss_kd": 100, "loss_de": 100}


@register_method
class EWC(TermMethod):
    """EWC weight regulariser."""
    name, preset = "EWC", {"regularizer": "ewc", "reg_importance": 100}


@register_method
class RW(TermMethod):
    """Riemannian Walk weight regulariser."""
    name, preset = "RW", {"regularizer": "rw", "reg_importance": 100}


@register_method
class PI(TermMethod):
    """Path Integral (SI) weight regulariser."""
    name, preset = "PI", {"regularizer": "pi", "reg_importance": 100}


@register_method
class MiB(TermMethod):
    """MiB: unbiased cross-entropy and distillation, new classifiers initialised from the background."""
    name, preset = "MiB", {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True}


@register_method
class PLOP(TermMethod):
    """PLOP: local POD distillation and entropy pseudo-labels."""
    name = "PLOP"
    preset = {
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}},
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    }
