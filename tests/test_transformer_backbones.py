"""The hierarchical backbones of Hugging Face transformers (MiT, Swin, ConvNeXt) through the model seam: named stage
features, SegFormer's all-MLP head, the weight converter (official MiT layout and transformers folders, offline), AWT's
exact and Captum attribution, and two-step runs through run.py, killed and resumed exactly. torchvision is never
imported."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, interrupt_at_epoch, smoke_args
from models.hierarchical import VARIANTS, HierarchicalBackbone
from segmentation_module import ModelSpec, build_model_from_spec
from utils.errors import UserError

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["mit_b0", "swin_t", "convnext_t"])
def test_four_named_stages_at_strides_4_to_32(name):
    torch.manual_seed(0)
    body = HierarchicalBackbone(name).eval()
    features = body(torch.randn(2, 3, 64, 64))
    shapes = body.output_shape()
    assert list(features) == ["stage1", "stage2", "stage3", "stage4"] == list(body.stage_features)
    for key, feature in features.items():
        assert feature.shape == (2, shapes[key].channels, 64 // shapes[key].stride, 64 // shapes[key].stride)
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]


def test_heads_on_a_mit_model():
    torch.manual_seed(0)
    seg = build_model_from_spec(ModelSpec(backbone="mit_b0", head="segformer", output_stride=32), [3, 2]).eval()
    logits, extras = seg(torch.randn(1, 3, 64, 64), ret_intermediate=True)
    assert logits.shape == (1, 5, 64, 64) and seg.output_stride == 4 and extras["pre_logits"].shape == (1, 256, 16, 16)
    assert [a.shape[1] for a in extras["attentions"]] == [32, 64, 160, 256, 256]
    deeplab = build_model_from_spec(ModelSpec(backbone="mit_b0", head="deeplabv3", output_stride=32, pooling=None),
                                    [3]).eval()
    assert deeplab.output_stride == 32 and deeplab(torch.randn(1, 3, 64, 64))[0].shape == (1, 3, 64, 64)
    with pytest.raises(UserError, match="--backbone mit_b0 builds output stride 32, not --output_stride 16"):
        build_model_from_spec(ModelSpec(backbone="mit_b0", output_stride=16), [3])


def _official_mit_layout(net_state: dict) -> dict:
    """A state in NVlabs' mix_transformer layout, written from a transformers model (the inverse of the converter's
    table, spelled out independently here), plus the ImageNet head the converter drops."""
    block = {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "attention.q_proj.": "attn.q.",
             "attention.o_proj.": "attn.proj.", "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
             "attention.sequence_reduction.layer_norm.": "attn.norm.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
             "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv."}
    out = {"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    for key, value in net_state.items():
        m = re.fullmatch(r"stages\.(\d)\.(.+)", key)
        stage, rest = int(m[1]) + 1, m[2]
        if rest.startswith("patch_embeddings."):
            part = rest.split(".")[1]
            out[f"patch_embed{stage}.{'proj' if part == 'proj' else 'norm'}.{rest.split('.')[-1]}"] = value
        elif rest.startswith("layer_norm."):
            out[f"norm{stage}.{rest.split('.')[-1]}"] = value
        else:
            b = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
            inner = b[2]
            if inner.startswith("attention.k_proj."):
                v = net_state[key.replace("k_proj", "v_proj")]
                out[f"block{stage}.{b[1]}.attn.kv.{inner.split('.')[-1]}"] = torch.cat([value, v])
                continue
            if inner.startswith("attention.v_proj."):
                continue
            old = next(o for o in block if inner.startswith(o))
            out[f"block{stage}.{b[1]}.{block[old]}{inner[len(old):]}"] = value
    return out


def test_converter_round_trips_official_mit_and_transformers_folders(tmp_path):
    from models.convert_weights import main as convert_main
    from models.hierarchical import load_converted

    torch.manual_seed(0)
    source = HierarchicalBackbone("mit_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    expected = source(x)
    official = tmp_path / "mit_b0.pth"
    torch.save(_official_mit_layout(source.net.state_dict()), official)
    assert convert_main(["--backbone", "mit_b0", str(official), str(tmp_path / "ours_mit.pth")]) == 0
    fresh = HierarchicalBackbone("mit_b0").eval()
    load_converted(fresh, str(tmp_path / "ours_mit.pth"))
    got = fresh(x)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    # a transformers checkpoint folder (here written by save_pretrained), loaded offline by transformers itself
    swin = HierarchicalBackbone("swin_t").eval()
    swin.net.save_pretrained(tmp_path / "swin_folder")
    assert convert_main(["--backbone", "swin_t", str(tmp_path / "swin_folder"), str(tmp_path / "ours_swin.pth")]) == 0
    other = HierarchicalBackbone("swin_t").eval()
    load_converted(other, str(tmp_path / "ours_swin.pth"))
    assert all(torch.allclose(other(x)[k], swin(x)[k], atol=1e-6) for k in swin.output_shape())
    # refusals: an existing output, a file of another backbone
    assert convert_main(["--backbone", "mit_b0", str(official), str(tmp_path / "ours_mit.pth")]) == 2
    assert convert_main(["--backbone", "mit_b1", str(official), str(tmp_path / "b1.pth")]) == 2
    assert not (tmp_path / "b1.pth").exists()


def test_exact_and_captum_select_the_same_channels_on_a_mit_model():
    from methods import attribution

    torch.manual_seed(0)
    model = build_model_from_spec(ModelSpec(backbone="mit_b0", head="segformer", output_stride=32), [6, 2]).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    exact = attribution.ExactAttributor(model)(images)
    captum = attribution.CaptumAttributor(model, n_steps=20, internal_batch_size=20)(images)
    assert torch.allclose(exact, captum, atol=1e-4 * float(exact.abs().max()))
    k = exact.numel() // 4
    assert set(exact.flatten().topk(k).indices.tolist()) == set(captum.flatten().topk(k).indices.tolist())


def test_building_and_training_never_import_torchvision(tmp_path):
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('torchvision', 'timm'):\n"
            "        raise AssertionError('imported ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import torch\n"
            "from segmentation_module import ModelSpec, build_model_from_spec\n"
            "for name in ('mit_b0', 'swin_t', 'convnext_t'):\n"
            "    m = build_model_from_spec(ModelSpec(backbone=name, head='segformer', output_stride=32), [3])\n"
            "    m(torch.randn(1, 3, 64, 64))[0].sum().backward()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_methods_that_cannot_run_on_them_say_so():
    from experiment.builders import build_model
    from experiment.config import parse_config
    from methods import build_method

    cfg = parse_config(["--method", "RCIL", "--backbone", "mit_b0", "--no_pretrained"])
    with pytest.raises(UserError, match="--method RCIL twins the residual blocks of a backbone; --backbone mit_b0 has "
                                        "no block option"):
        build_model(cfg, 0, method=build_method(cfg), pretrained=False)
    cfg = parse_config(["--method", "SSUL", "--backbone", "mit_b0", "--head", "segformer"])
    with pytest.raises(UserError, match=r"--method SSUL builds its own head \(aspp\); drop --head segformer"):
        build_model(cfg, 0, method=build_method(cfg), pretrained=False)
    cfg = parse_config(["--backbone", "mit_b0"])
    with pytest.raises(UserError, match=r"pretrained weights not found: .*mit_b0.pth"):
        build_model(cfg, 0, method=build_method(cfg))


RUNS = {"mit_b0 MiB+AWT": ["--backbone", "mit_b0", "--method", "MiB", "--att", "25", "--mask_att"],
        "mit_b0 PLOP": ["--backbone", "mit_b0", "--method", "PLOP"],
        "mit_b0 MiB+AWT deeplabv3": ["--backbone", "mit_b0", "--head", "deeplabv3", "--method", "MiB", "--att", "25",
                                    "--mask_att"],
        "mit_b0 PLOP deeplabv3": ["--backbone", "mit_b0", "--head", "deeplabv3", "--method", "PLOP"],
        "mit_b0 SSUL": ["--backbone", "mit_b0", "--method", "SSUL"],
        "mit_b0 MiB+DropClass": ["--backbone", "mit_b0", "--method", "MiB", "--dropclass"],
        "mit_b0 MiB+NeST": ["--backbone", "mit_b0", "--method", "MiB", "--nest", "--warm_epochs", "1"],
        "swin_t MiB+AWT": ["--backbone", "swin_t", "--method", "MiB", "--att", "25", "--mask_att"],
        "convnext_t PLOP": ["--backbone", "convnext_t", "--method", "PLOP"]}
# Swin and ConvNeXt run one method each here (the other method and the deeplabv3 head run on mit_b0): the suite's
# time limit; both combinations were run before, with the same code path per backbone.


@pytest.mark.slow
@pytest.mark.parametrize("run_id", sorted(RUNS))
def test_two_steps_through_run_py(synthetic_voc, tmp_path, run_id, caplog):
    import run

    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=[*RUNS[run_id], "--crop_size", "64", "--lr",
                                                                    "0.01", "0.001", "--overlap"])
    with caplog.at_level("INFO"):
        assert run.main(args) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 1 test: mIoU" in text
    state = torch.load(os.path.join(tmp_path, "ckpt", "15-5-voc_Experiment_1.pth"), weights_only=True)["model_state"]
    assert any(k.startswith("body.net.") for k in state)
    head = "aspp" if "SSUL" in run_id else "deeplabv3" if "deeplabv3" in run_id else "segformer"
    assert ("head.linear.stage1.weight" in state) == (head == "segformer")
    assert ("head.project.0.weight" in state) == (head == "aspp")  # SSUL's torchvision ASPP on stage4
    if "PLOP" in run_id:
        assert any("loss_pod=" in line and "loss_pod=0.0000" not in line for line in text.splitlines())
    if "AWT" in run_id:
        assert "new classifier initialised from the background classifier (attribution mask" in text
    if "NeST" in run_id:
        assert "NeST folded into the new classifier" in text
    if "DropClass" in run_id:
        assert "loss_ce_drop=" in text and state["drop.frozen_rows"].shape == (16, 256)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mit_b0", "swin_t"])  # ConvNeXt has no state beyond its weights either
def test_a_killed_run_resumes_to_the_same_bytes(synthetic_voc, tmp_path, monkeypatch, backbone):
    import run
    import train

    def args(out):
        return smoke_args(synthetic_voc, out, extra=["--backbone", backbone, "--method", "FT", "--epochs", "2",
                                                     "--crop_size", "64", "--lr", "0.01"])

    assert run.main(args(tmp_path / "whole")) == 0
    original = interrupt_at_epoch(monkeypatch, 1)
    assert run.main(args(tmp_path / "killed")) == 130
    monkeypatch.setattr(train, "train_one_epoch", original)
    assert run.main(args(tmp_path / "killed")) == 0
    whole = torch.load(tmp_path / "whole" / "ckpt" / "15-5-voc_Experiment_0.pth", weights_only=True)["model_state"]
    resumed = torch.load(tmp_path / "killed" / "ckpt" / "15-5-voc_Experiment_0.pth", weights_only=True)["model_state"]
    assert list(whole) == list(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_every_variant_is_registered():
    from models import BACKBONES

    assert set(VARIANTS) <= set(BACKBONES)
    assert {n for n in VARIANTS if n.startswith("mit_b")} == {f"mit_b{i}" for i in range(6)}


def _official_swin_layout(net_state: dict) -> dict:
    """A state in microsoft/Swin-Transformer's layout, written from a transformers SwinBackbone (the inverse of the
    converter's table, spelled out here), plus what the converter drops: the ImageNet head and the recomputed
    buffers."""
    block = {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
             "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
             "attention.o_proj.": "attn.proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    out = {"head.weight": torch.randn(1000, 8), "head.bias": torch.randn(1000)}
    for key, value in net_state.items():
        if key.startswith("hidden_states_norms."):
            continue
        if m := re.fullmatch(r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", key):
            out[f"patch_embed.proj.{m[1]}"] = value
        elif m := re.fullmatch(r"swin\.embeddings\.norm\.(weight|bias)", key):
            out[f"patch_embed.norm.{m[1]}"] = value
        elif m := re.fullmatch(r"swin\.layernorm\.(weight|bias)", key):
            out[f"norm.{m[1]}"] = value
        elif m := re.fullmatch(r"swin\.encoder\.layers\.(\d)\.downsample\.(.+)", key):
            out[f"layers.{m[1]}.downsample.{m[2]}"] = value
        else:
            b = re.fullmatch(r"swin\.encoder\.layers\.(\d)\.blocks\.(\d+)\.(.+)", key)
            prefix, inner = f"layers.{b[1]}.blocks.{b[2]}.", b[3]
            if inner.startswith("attention.q_proj."):
                kind = inner.split(".")[-1]
                parts = [net_state[key.replace(".q_proj.", f".{p}.")] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts)
                out[f"{prefix}attn.relative_position_index"] = torch.zeros(1, dtype=torch.long)
                continue
            if inner.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            old = next(o for o in block if inner.startswith(o))
            out[prefix + block[old] + inner[len(old):]] = value
    return out


def test_converter_round_trips_official_swin(tmp_path):
    from models.convert_weights import convert, main as convert_main
    from models.hierarchical import load_converted

    torch.manual_seed(0)
    source = HierarchicalBackbone("swin_t").eval()
    with torch.no_grad():  # the per-stage norms are not in the official file: keep them at their initialisation
        for name, p in source.net.named_parameters():
            if not name.startswith("hidden_states_norms."):
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(1, 3, 64, 64)
    expected = source(x)
    official = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": _official_swin_layout(source.net.state_dict())}, official)
    assert convert_main(["--backbone", "swin_t", str(official), str(tmp_path / "ours.pth")]) == 0
    fresh = HierarchicalBackbone("swin_t").eval()
    load_converted(fresh, str(tmp_path / "ours.pth"))
    got = fresh(x)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    # NeST's Swin-B: window 12 (bias tables of 23 x 23 entries) from the official window-12 file's layout
    swin_b = HierarchicalBackbone("swin_b_w12")
    table = swin_b.net.swin.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert tuple(table.shape) == (23 * 23, 4)
    state = convert("swin_b_w12", _save(tmp_path / "b.pth", _official_swin_layout(swin_b.net.state_dict())))
    assert set(state) == {f"net.{k}" for k in swin_b.net.state_dict()}
    assert convert_main(["--backbone", "swin_s", str(official), str(tmp_path / "s.pth")]) == 2  # another size


def _save(path, state) -> str:
    torch.save(state, path)
    return str(path)


def test_aspp_rates_set_the_deeplab_dilations_and_are_a_model_flag(tmp_path):
    from experiment.checkpoints import check_model_flags
    from experiment.config import parse_config, dump
    from modules.deeplab import DeeplabV3

    spec = ModelSpec(backbone="swin_t", head="deeplabv3", output_stride=32, pooling=None, aspp_rates=(6, 12, 18))
    model = build_model_from_spec(spec, [3])
    head = next(m for m in model.modules() if isinstance(m, DeeplabV3))
    assert [c.dilation[0] for c in head.map_convs[1:]] == [6, 12, 18]
    default = build_model_from_spec(spec.replace(aspp_rates=None), [3])
    assert [c.dilation[0] for c in next(m for m in default.modules() if isinstance(m, DeeplabV3)).map_convs[1:]] \
        == [3, 6, 9]
    cfg = parse_config(["--backbone", "swin_t", "--head", "deeplabv3", "--aspp_rates", "6", "12", "18"])
    other = parse_config(["--backbone", "swin_t", "--head", "deeplabv3"])
    with pytest.raises(UserError, match=r"trained with --aspp_rates 6 12 18, this run builds --aspp_rates \(default\)"):
        check_model_flags({"config": dump(cfg)}, other, "x.pth", "previous-step checkpoint")
    check_model_flags({"config": dump(cfg)}, cfg, "x.pth", "previous-step checkpoint")
    with pytest.raises(SystemExit):
        parse_config(["--aspp_rates", "6", "12"])
