"""The body-to-head contract with a backbone the framework does not ship: a tiny four-scale network at stride 32
(the shape of SegFormer's MiT, Swin or ConvNeXt) and a multi-scale head, both registered here, train MiB+AWT and PLOP
(POD on the four stage features) for two steps through run.py without a change to the core."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import smoke_args
from models import BACKBONES
from models.registry import Backbone, BackboneFamily, register_backbone
from modules.registry import HEADS, ShapeSpec
from segmentation_module import ModelSpec, build_model_from_spec
from utils.errors import UserError

WIDTHS = (8, 16, 24, 32)
NAMES = ("c2", "c3", "c4", "c5")


class TinyPyramid(Backbone):
    """A 4x4 patch stem, then three 2x downsamplings: features at strides 4, 8, 16 and 32."""

    out_feature = "c5"
    stage_features = NAMES

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 4, stride=4), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(WIDTHS, WIDTHS[1:]))

    def output_shape(self):
        return {name: ShapeSpec(channels=w, stride=4 * 2 ** i) for i, (name, w) in enumerate(zip(NAMES, WIDTHS))}

    def forward(self, x):
        features = {"c2": self.stem(x)}
        for name, stage in zip(NAMES[1:], self.stages):
            features[name] = stage(features[list(features)[-1]])
        return features


class TinyFPN(nn.Module):
    """Every scale to ``channels`` by a 1x1 conv, upsampled to stride 4 and summed: a multi-scale decoder that reads
    its inputs by name and answers at stride 4."""

    output_stride = 4

    def __init__(self, shapes: dict[str, ShapeSpec], channels: int):
        super().__init__()
        self.names = [n for n in NAMES if n in shapes]
        self.lateral = nn.ModuleDict({n: nn.Conv2d(shapes[n].channels, channels, 1) for n in self.names})

    def forward(self, features):
        size = features[self.names[0]].shape[-2:]
        out = sum(F.interpolate(self.lateral[n](features[n]), size=size, mode="bilinear", align_corners=False)
                  for n in self.names)
        return F.relu(out)


def _load(body, path):
    body.load_state_dict(torch.load(path, weights_only=True))


FAMILY = BackboneFamily(build=lambda *, norm_act, output_stride, bn_momentum=None: TinyPyramid(),
                        pretrained_file=lambda norm_act: "tiny_pyramid.pth", load_pretrained=_load,
                        uses_norm_act=False, description="a four-scale test network", strides=(32,),
                        default_stride=32, arch="tiny_pyramid", layout="test", default_head="tiny_fpn")


@pytest.fixture
def tiny_family():
    register_backbone("tiny_pyramid", FAMILY)
    HEADS.add("tiny_fpn", lambda spec, shapes, in_feature: TinyFPN(shapes, spec.head_channels))
    try:
        yield FAMILY
    finally:
        BACKBONES.pop("tiny_pyramid")
        HEADS.pop("tiny_fpn")


def test_named_features_and_shapes_reach_the_heads(tiny_family):
    body = TinyPyramid().eval()
    features = body(torch.randn(1, 3, 64, 64))
    for name, shape in body.output_shape().items():
        assert features[name].shape == (1, shape.channels, 64 // shape.stride, 64 // shape.stride)
    fpn = build_model_from_spec(ModelSpec(backbone="tiny_pyramid", head="tiny_fpn", output_stride=32), [3, 2])
    logits, extras = fpn.eval()(torch.randn(2, 3, 64, 64), ret_intermediate=True)
    assert logits.shape == (2, 5, 64, 64) and fpn.output_stride == 4
    assert extras["sem_logits_small"].shape[-1] == 16 and [a.shape[1] for a in extras["attentions"]] == [8, 16, 24,
                                                                                                      32, 256]
    # the reference head on the deepest feature, its ASPP rates from that feature's stride
    aspp = build_model_from_spec(ModelSpec(backbone="tiny_pyramid", output_stride=32, pooling=None), [3])
    assert aspp.output_stride == 32 and aspp.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 3, 64, 64)
    with pytest.raises(UserError, match=r"--backbone tiny_pyramid builds output stride 32, not --output_stride 16"):
        build_model_from_spec(ModelSpec(backbone="tiny_pyramid", output_stride=16), [3])
    with pytest.raises(UserError, match="the deeplabv3 head reads feature 'res5', but --backbone tiny_pyramid gives "
                                        "c2, c3, c4, c5"):
        build_model_from_spec(ModelSpec(backbone="tiny_pyramid", output_stride=32, head_in_feature="res5"), [3])


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--method", "MiB", "--att", "25", "--mask_att"], ["--method", "PLOP"]],
                         ids=["MiB+AWT", "PLOP"])
def test_two_steps_through_run_py(tiny_family, synthetic_voc, tmp_path, method, caplog):
    import run

    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=[
        *method, "--backbone", "tiny_pyramid", "--crop_size", "64", "--lr", "0.01", "0.001", "--overlap"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    state = torch.load(os.path.join(tmp_path, "ckpt", "15-5-voc_Experiment_1.pth"), weights_only=True)["model_state"]
    assert state["body.stages.2.0.weight"].shape == (32, 24, 3, 3) and state["cls.1.weight"].shape == (5, 256, 1, 1)
    assert "head.lateral.c2.weight" in state and "step 1 test: mIoU" in text
    if "PLOP" in method:  # POD distilled the four stage features and the head's output at step 1
        pod = [line for line in text.splitlines() if "loss_pod=" in line]
        assert pod and any("loss_pod=0.0000" not in line for line in pod)
    else:  # AWT attributed the old model's background logit and transferred on 25 % of the 256 channels
        mask = [f for _, _, files in os.walk(tmp_path / "channels") for f in files if f.endswith(".pt")]
        assert mask and "selected 64 of 256 channels" in text
        assert "new classifier initialised from the background classifier (attribution mask" in text
