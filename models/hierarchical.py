"""Hierarchical backbones from Hugging Face ``transformers``: SegFormer's Mix Transformer (``mit_b0`` ... ``mit_b5``),
Swin (``swin_t``, ``swin_s``, ``swin_b``; ``swin_b_w12``: window 12, NeST's) and ConvNeXt (``convnext_t``,
``convnext_s``, ``convnext_b``).

Each returns four named stage features ``stage1`` ... ``stage4`` at strides 4, 8, 16 and 32, channels first (Swin's
and ConvNeXt's through ``transformers``' backbone classes, which apply their per-stage norms and move the channels
first once; MiT's hidden states already are). The model classes are built from configurations written here, so no
hub is contacted; ImageNet weights come from a local file in this framework's layout (``pretrained/{name}.pth``),
which ``python -m models.convert_weights`` writes from the official or the ``transformers`` checkpoints
(``pretrained/README.md``). ``transformers`` is imported when such a backbone is built, not before.

Their default head is SegFormer's all-MLP decoder (``--head segformer``, ``modules/segformer_head.py``); the DeepLab-v3
head reads ``stage4`` (``--head deeplabv3``).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from models.registry import Backbone, BackboneFamily, register_backbone
from modules.registry import ShapeSpec
from utils.checkpoint import safe_load
from utils.errors import UserError

STAGES = ("stage1", "stage2", "stage3", "stage4")

# name -> (kind, configuration keywords). Sizes from the papers' model tables (SegFormer Table 6 / NVlabs mix_transformer,
# Swin Table 1, ConvNeXt Section 2.6), with ImageNet-1k window 7 for Swin.
_MIT = dict(num_channels=3, num_encoder_blocks=4, sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3],
            strides=[4, 2, 2, 2], num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.1)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mit_b0": ("segformer", {**_MIT, "hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2]}),
    "mit_b1": ("segformer", {**_MIT, "hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2]}),
    "mit_b2": ("segformer", {**_MIT, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3]}),
    "mit_b3": ("segformer", {**_MIT, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3]}),
    "mit_b4": ("segformer", {**_MIT, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3]}),
    "mit_b5": ("segformer", {**_MIT, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3]}),
    "swin_t": ("swin", {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                        "drop_path_rate": 0.2}),
    "swin_s": ("swin", {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                        "drop_path_rate": 0.3}),
    "swin_b": ("swin", {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 7,
                        "drop_path_rate": 0.3}),
    # NeST's Swin-B (zhengyuan-xie/ECCV24_NeST models/swin.py _swin_b): window 12, pre-trained at 384 px
    # (the official swin_base_patch4_window12_384.pth), drop path 0.3
    "swin_b_w12": ("swin", {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12,
                            "image_size": 384, "drop_path_rate": 0.3}),
    "convnext_t": ("convnext", {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3], "drop_path_rate": 0.1}),
    "convnext_s": ("convnext", {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 27, 3],
                                "drop_path_rate": 0.4}),
    "convnext_b": ("convnext", {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3],
                                "drop_path_rate": 0.5}),
}


def require_transformers():
    """The ``transformers`` package, or one line saying how to install it."""
    try:
        import transformers  # noqa: PLC0415 - imported only when a transformer backbone is built
    except ImportError as exc:  # pragma: no cover - the requirement files install it
        raise UserError(f"the transformer backbones need Hugging Face transformers ({exc}); install it with "
                        "pip install -r requirements.txt") from None
    return transformers


def build_net(name: str) -> nn.Module:
    """The ``transformers`` module of ``name`` with random weights (nothing is downloaded)."""
    kind, options = VARIANTS[name]
    tf = require_transformers()
    if kind == "segformer":
        return tf.SegformerModel(tf.SegformerConfig(**options))
    if kind == "swin":
        return tf.SwinBackbone(tf.SwinConfig(**options, out_features=list(STAGES)))
    return tf.ConvNextBackbone(tf.ConvNextConfig(**options, out_features=list(STAGES)))


def stage_channels(name: str) -> list[int]:
    kind, options = VARIANTS[name]
    if kind == "swin":
        return [options["embed_dim"] * 2 ** i for i in range(4)]
    return list(options["hidden_sizes"])


class HierarchicalBackbone(Backbone):
    """``net``: a ``transformers`` SegFormer encoder or a Swin / ConvNeXt backbone; ``forward`` returns
    ``{"stage1": (B, C1, H/4, W/4), ..., "stage4": (B, C4, H/32, W/32)}``."""

    out_feature = "stage4"
    stage_features = STAGES

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.kind = VARIANTS[name][0]
        self.net = build_net(name)
        self._shapes = {s: ShapeSpec(c, 4 * 2 ** i) for i, (s, c) in enumerate(zip(STAGES, stage_channels(name)))}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "segformer":
            maps = self.net(pixel_values=x, output_hidden_states=True, return_dict=True).hidden_states
        else:
            maps = self.net(pixel_values=x, return_dict=True).feature_maps
        # Swin's and ConvNeXt's maps come back as permuted views of channels-last tensors; some backward kernels of
        # the heads (pooling) need contiguous gradients, so they are made contiguous once, here
        return {name: m.contiguous() for name, m in zip(STAGES, maps)}


def load_converted(body: nn.Module, path: str) -> None:
    """Load ``pretrained/{name}.pth`` (this framework's layout: ``net.*`` keys, written by models.convert_weights)
    strictly; a mismatch is one line."""
    state = safe_load(path, "pretrained backbone file")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"pretrained backbone file {path} holds no state dict")
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"pretrained backbone file {path} does not fit --backbone {body.name}: missing {len(missing)}"
                        f"{f' (first {missing[0]})' if missing else ''}, unexpected {len(unexpected)}"
                        f"{f' (first {unexpected[0]})' if unexpected else ''}; convert the official file with "
                        f"python -m models.convert_weights --backbone {body.name} SOURCE {os.path.basename(path)}")


def _family(name: str) -> BackboneFamily:
    kind = VARIANTS[name][0]
    return BackboneFamily(
        build=lambda *, norm_act, output_stride, bn_momentum=None: HierarchicalBackbone(name),
        pretrained_file=lambda norm_act: f"{name}.pth", load_pretrained=load_converted, uses_norm_act=False,
        description=f"transformers {kind}: stages at strides 4-32, converted ImageNet weights", strides=(32,),
        default_stride=32, arch=name, layout="transformers", default_head="segformer")


for _name in VARIANTS:
    register_backbone(_name, _family(_name))
