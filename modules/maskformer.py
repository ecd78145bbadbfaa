"""MaskFormer (Cheng et al., NeurIPS 2021) as model parts, the head family SimFormer builds on (simformer.md section
2): the head ``maskformer`` (an FPN pixel decoder with GroupNorm giving per-pixel embeddings at stride 4, and a
transformer decoder whose learnt queries attend to the deepest feature) and the classifier wrapper
``mask_classification`` (class logits of every query from the model's per-step classifiers plus a no-object logit,
mask logits = query embedding . pixel embeddings, MaskFormer's semantic inference as the model's logits).

The per-step classifiers are the model's usual 1x1 convolutions, applied to the query embeddings: a step adds rows
for its classes, as incremental mask-classification methods (CoMFormer) do. Defaults from SimFormer's configs: 100
queries, 6 decoder layers, 8 heads, hidden 256, FFN 2048, dropout 0.1, no encoder layer, deep supervision (the
wrapper returns every layer's outputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.registry import CLASSIFIER_WRAPPERS, HEADS, ClassifierWrapper, ShapeSpec

QUERIES, LAYERS, HEADS_N, FFN, DROPOUT = 100, 6, 8, 2048, 0.1
EPS = 1e-6  # floor of the class scores before the log that makes them the model's logits


def _conv_gn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(32, cout), nn.ReLU(True))


def sine_position(x: Tensor, dim: int) -> Tensor:
    """DETR's 2-D sine positional encoding (normalised, temperature 10000) of a (B, C, H, W) map -> (B, dim, H, W)."""
    b, _, h, w = x.shape
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w) / (h + EPS) * 2 * math.pi
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w) / (w + EPS) * 2 * math.pi
    half = dim // 2
    t = 10000 ** (2 * (torch.arange(half, device=x.device) // 2) / half)
    px, py = x_embed[..., None] / t, y_embed[..., None] / t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(-2)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([py, px], -1).permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


class MaskFormerHead(nn.Module):
    """Features -> ``{"pre_logits": per-pixel embeddings (B, D, H/4, W/4), "queries": (L, B, Q, D)}``."""

    output_stride = 4

    def __init__(self, shapes: dict[str, ShapeSpec], dim: int = 256, queries: int = QUERIES, layers: int = LAYERS):
        super().__init__()
        names = sorted((n for n in shapes if not n.endswith("_pre")), key=lambda n: shapes[n].stride)
        if len(names) < 2 or shapes[names[0]].stride != 4:
            raise ValueError(f"the maskformer head needs features from stride 4 up, got {names}")
        self.names = names
        self.lateral = nn.ModuleList([nn.Sequential(nn.Conv2d(shapes[n].channels, dim, 1, bias=False),
                                                    nn.GroupNorm(32, dim)) for n in names[:-1]])
        self.top = _conv_gn(shapes[names[-1]].channels, dim, 3)
        self.output = nn.ModuleList([_conv_gn(dim, dim, 3) for _ in names[:-1]])
        self.mask_features = nn.Conv2d(dim, dim, 3, padding=1)
        self.input_proj = nn.Conv2d(shapes[names[-1]].channels, dim, 1)
        self.query_pos = nn.Embedding(queries, dim)
        self.layers = nn.ModuleList([nn.TransformerDecoderLayer(dim, HEADS_N, FFN, DROPOUT, batch_first=True)
                                     for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        deepest = features[self.names[-1]]
        y = self.top(deepest)
        for name, lateral, output in zip(reversed(self.names[:-1]), reversed(self.lateral), reversed(self.output)):
            x = lateral(features[name])
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))
        memory = self.input_proj(deepest)
        pos = sine_position(memory, self.dim)
        memory = (memory + pos).flatten(2).transpose(1, 2)  # position added to keys and values (simplification)
        b = deepest.shape[0]
        query_pos = self.query_pos.weight[None].expand(b, -1, -1)
        q = torch.zeros_like(query_pos)  # MaskFormer (DETR): zero targets; the learnt positions are the queries
        outputs = []
        for layer in self.layers:
            q = layer(q + query_pos, memory)
            outputs.append(self.norm(q))
        return {"pre_logits": self.mask_features(y), "queries": torch.stack(outputs)}


@HEADS.register("maskformer")
def build_maskformer_head(spec, shapes: dict[str, ShapeSpec], in_feature: str) -> MaskFormerHead:
    """Reads every stage from stride 4; its outputs need the ``mask_classification`` wrapper. Options (``spec.
    head_options``): ``queries``, ``layers`` (SimFormer's 100 and 6 by default)."""
    return MaskFormerHead(shapes, spec.head_channels, **dict(spec.head_options))


build_maskformer_head.wrapper = "mask_classification"  # the wrapper a model with this head must have
build_maskformer_head.classifies = "queries"  # its classifiers read query embeddings, not per-pixel features


class MaskClassification(ClassifierWrapper):
    """Per decoder layer: class logits (B, Q, C + 1) = the model's classifiers on the query embeddings and a
    no-object logit; mask logits (B, Q, h, w) = MLP(query) . pixel embeddings. The model's logits are the log of
    MaskFormer's semantic scores of the last layer (``sum_q softmax(cls_q)[:C] sigmoid(mask_q)``), so the methods
    that read logits see a distribution-like map; extras: ``mask_cls``, ``mask_pred``, ``aux_outputs``."""

    state_key = "mask_classification"

    def __init__(self, dim: int):
        super().__init__()
        self.no_object = nn.Linear(dim, 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(True), nn.Linear(dim, dim), nn.ReLU(True),
                                        nn.Linear(dim, dim))

    def layer_outputs(self, query: Tensor, pixels: Tensor, classify) -> tuple[Tensor, Tensor]:
        b, q, d = query.shape
        cls = classify(query.reshape(b * q, d, 1, 1)).reshape(b, q, -1)
        cls = torch.cat([cls, self.no_object(query)], -1)
        masks = torch.einsum("bqd,bdhw->bqhw", self.mask_embed(query), pixels)
        return cls, masks

    def forward(self, features: Tensor, classify, rows, size, queries: Tensor | None = None):
        if queries is None:
            raise ValueError("the mask_classification wrapper needs the maskformer head's queries")
        outs = [self.layer_outputs(q, features, classify) for q in queries]
        cls, masks = outs[-1]
        scores = torch.einsum("bqk,bqhw->bkhw", cls.float().softmax(-1)[..., :-1], masks.float().sigmoid())
        extras = {"mask_cls": cls, "mask_pred": masks,
                  "aux_outputs": [{"mask_cls": c, "mask_pred": m} for c, m in outs[:-1]]}
        return scores.clamp_min(EPS).log().to(features.dtype), extras


@CLASSIFIER_WRAPPERS.register("mask_classification")
def build_mask_classification(spec, classes) -> MaskClassification:
    return MaskClassification(spec.head_channels)
