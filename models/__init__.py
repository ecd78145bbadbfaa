"""Backbones and normalisation layers."""
from models.norm import ABN, ABNSync, BatchNormAct, HAS_INPLACE_ABN, NORM_ACT, is_norm_layer
from models.resnet import STRUCTURES, ResNet, build_backbone, net_resnet18, net_resnet50, net_resnet101

__all__ = ["ABN", "ABNSync", "BatchNormAct", "HAS_INPLACE_ABN", "NORM_ACT", "is_norm_layer", "STRUCTURES", "ResNet",
           "build_backbone", "net_resnet18", "net_resnet50", "net_resnet101"]
