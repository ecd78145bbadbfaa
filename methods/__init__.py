"""Continual-learning methods: step plugins, loss terms, presets and the registries that hold them.

Importing the package registers everything. Term registration order is execution order: pseudo-labelling first (it
rewrites ``batch.labels``/``pixel_weight`` in ``prepare``), then classification, output/feature distillation, POD and
the regularisers last. Methods and extensions (``methods.stack``) compose in registration order.
"""
from __future__ import annotations

# The imports below register the terms, methods and extensions; their order fixes the registries' order.
from methods import pseudo as _pseudo  # noqa: F401
from methods import classification as _classification  # noqa: F401
from methods import mask_classification as _mask_classification  # noqa: F401
from methods import distillation as _distillation  # noqa: F401
from methods import pod as _pod  # noqa: F401
from methods import regularizers as _regularizers  # noqa: F401
from methods import presets as _presets  # noqa: F401
from methods import awt as _awt  # noqa: F401
from methods import ssul as _ssul  # noqa: F401
from methods import rcil as _rcil  # noqa: F401
from methods import dropclass as _dropclass  # noqa: F401
from methods import nest as _nest  # noqa: F401
from methods import dkd as _dkd  # noqa: F401
from methods import star as _star  # noqa: F401
from methods import wilson as _wilson  # noqa: F401
from methods import simformer as _simformer  # noqa: F401
from methods.base import Batch, Extension, LossTerm, Method, StepContext, TrainInputs, TransferSource, pixel_mean
from methods.criterion import (UNSUPPORTED, Criterion, add_extension_args, add_method_args, build_criterion,
                               build_terms, check_supported)
from methods.registry import (EXTENSIONS, METHODS, PRESETS, TERMS, method_name, register_extension, register_method,
                              register_term)
from methods.stack import MethodStack, build_method

__all__ = ["Batch", "LossTerm", "Method", "Extension", "StepContext", "TrainInputs", "TransferSource", "Criterion",
           "MethodStack", "TERMS", "METHODS", "EXTENSIONS", "PRESETS", "UNSUPPORTED", "register_term",
           "register_method", "register_extension", "method_name", "add_method_args", "add_extension_args", "build_criterion",
           "build_terms", "build_method", "check_supported", "pixel_mean"]
