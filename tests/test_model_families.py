"""Model families: the torchvision-layout ResNet (keys, dilation, torchvision ImageNet files), the per-step heads and
the ASPP head of SSUL's layout, and the registries that assemble them."""
from __future__ import annotations

import pytest
import torch

import modules.rcil  # noqa: F401  (RCIL's twin head and SSUL's conv head register from their own files)
import modules.ssul  # noqa: F401
from models import BACKBONES
from models.tv_resnet import build_tv_backbone, load_torchvision_weights
from segmentation_module import CLASSIFIERS, HEADS, ModelSpec, build_model_from_spec, make_model
from utils.checkpoint import classes_in_state
from utils.errors import UserError

# len(torchvision.models.resnetXX().state_dict()), fc included (written out, torchvision is not a dependency)
TORCHVISION_KEY_COUNTS = {"tv_resnet18": 122, "tv_resnet50": 320, "tv_resnet101": 626}


def _torchvision_like_state(name: str, seed: int = 0) -> dict:
    """A state dict in torchvision's file layout: our keys, plus ``fc.*``, random values."""
    gen = torch.Generator().manual_seed(seed)
    body = build_tv_backbone(name)
    state = {k: (torch.rand(v.shape, generator=gen) if v.is_floating_point() else v)
             for k, v in body.state_dict().items()}
    width = body.out_channels
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, width, generator=gen), torch.randn(1000, generator=gen)
    return state


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEY_COUNTS))
def test_torchvision_layout_keys(name):
    keys = list(build_tv_backbone(name).state_dict())
    assert len(keys) + 2 == TORCHVISION_KEY_COUNTS[name]  # + fc.weight, fc.bias
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer1.0.conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert ("layer1.0.downsample.0.weight" in keys) == (name != "tv_resnet18")
    assert "layer2.0.downsample.1.weight" in keys


def test_torchvision_dilation_and_stride_follow_replace_stride_with_dilation():
    os16 = build_tv_backbone("tv_resnet50", output_stride=16)
    assert os16.layer4[0].conv2.stride == (1, 1) and os16.layer4[0].conv2.dilation == (1, 1)
    assert os16.layer4[1].conv2.dilation == (2, 2) and os16.layer4[0].downsample[0].stride == (1, 1)
    assert os16.layer3[0].conv2.stride == (2, 2)  # v1.5: the stride sits on the 3x3 conv
    os8 = build_tv_backbone("tv_resnet50", output_stride=8)
    assert os8.layer3[1].conv2.dilation == (2, 2) and os8.layer4[0].conv2.dilation == (2, 2)
    assert os8.layer4[1].conv2.dilation == (4, 4)
    x = torch.randn(1, 3, 64, 64)
    for body, side in ((os16, 4), (os8, 8)):
        features = body.eval()(x)
        shapes = body.output_shape()
        assert set(features) == set(shapes) and body.out_feature == "res5" and len(body.stage_features) == 4
        for name, feature in features.items():
            assert feature.shape[1] == shapes[name].channels and feature.shape[-1] == 64 // shapes[name].stride
        assert features["res5"].shape == (1, 2048, side, side) and shapes["res5"].stride == 64 // side
        assert torch.equal(torch.relu(features[body.stage_features[-1]]), features["res5"])  # pre-activation


def test_torchvision_file_loads_strictly_and_mismatches_are_one_line(tmp_path):
    state = _torchvision_like_state("tv_resnet18")
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    body = build_tv_backbone("tv_resnet18")
    load_torchvision_weights(body, str(path))
    assert torch.equal(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    broken = dict(state)
    del broken["layer2.0.bn1.weight"]
    torch.save(broken, path)
    with pytest.raises(UserError, match="missing 1: layer2.0.bn1.weight") as err:
        load_torchvision_weights(build_tv_backbone("tv_resnet18"), str(path))
    assert "\n" not in str(err.value)


def test_registries_build_the_reference_family_unchanged():
    torch.manual_seed(0)
    a = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 2])
    torch.manual_seed(0)
    b = build_model_from_spec(ModelSpec(backbone="resnet18", norm_act="abn"), [3, 2])
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert "cls.1.weight" in a.state_dict() and "head.map_convs.0.weight" in a.state_dict()
    assert set(BACKBONES) >= {"resnet18", "resnet50", "resnet101", "tv_resnet18", "tv_resnet50", "tv_resnet101"}
    assert set(HEADS) == {"deeplabv3", "aspp", "segformer", "maskformer", "twin_deeplabv3"}
    assert set(CLASSIFIERS) == {"conv1x1", "conv_head"}


def test_ssul_layout_model_keys_forward_and_class_layout():
    spec = ModelSpec(backbone="tv_resnet18", head="aspp", classifier="conv_head")
    model = build_model_from_spec(spec, [1, 1, 15, 1]).eval()
    state = model.state_dict()
    assert "head.convs.4.1.weight" in state and "head.project.0.weight" in state  # torchvision/SSUL ASPP
    assert state["cls.2.0.weight"].shape == (256, 256, 3, 3) and state["cls.2.3.weight"].shape == (15, 256, 1, 1)
    assert classes_in_state(state) == [1, 1, 15, 1]
    logits, extras = model(torch.randn(2, 3, 48, 48), ret_intermediate=True)
    assert logits.shape == (2, 18, 48, 48) and extras["sem_logits_small"].shape == (2, 18, 3, 3)


def test_spec_errors_name_the_choices():
    with pytest.raises(UserError, match="unknown head 'fpn'; choose one of aspp, deeplabv3"):
        build_model_from_spec(ModelSpec(backbone="resnet18", head="fpn"), [2])
    with pytest.raises(UserError, match="unknown --backbone"):
        build_model_from_spec(ModelSpec(backbone="vgg16"), [2])


def test_run_py_trains_the_torchvision_family(synthetic_voc, tmp_path):
    """``--backbone tv_resnet18`` through run.py, two steps (its norm layers are BatchNorm whatever --norm_act)."""
    import run
    from conftest import smoke_args

    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=["--backbone", "tv_resnet18", "--method", "MiB",
                                                                    "--lr", "0.01", "0.001", "--overlap"])
    assert run.main(args) == 0
    state = torch.load(tmp_path / "ckpt" / "15-5-voc_Experiment_1.pth", weights_only=True)["model_state"]
    assert "body.layer4.1.bn2.weight" in state and classes_in_state(state) == [16, 5]
