"""Model: shapes, state-dict layout, pretrained loading, ABN maths, image pooling, fix_bn, sync ABN (CPU, fast)."""
from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.norm import ABN, ABNSync, BatchNormAct, NORM_ACT, is_norm_layer  # noqa: E402
from modules.deeplab import DeeplabV3  # noqa: E402
from modules.residual import ResidualBlock  # noqa: E402
from segmentation_module import IncrementalSegmentationModule, load_pretrained_body, make_model  # noqa: E402
from utils.errors import UserError  # noqa: E402

torch.set_num_threads(1)


def small(norm_act="abn", output_stride=16, classes=(3, 2), **kw):
    torch.manual_seed(0)
    return make_model(backbone="resnet18", norm_act=norm_act, output_stride=output_stride, classes=list(classes), **kw)


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("norm_act", ["abn", "iabn", "iabn_sync", "std"])
def test_resnet18_shapes(output_stride, norm_act):
    model = small(norm_act, output_stride).train()
    x = torch.randn(2, 3, 64, 64)
    logits, extras = model(x, ret_intermediate=True)
    h = 64 // output_stride
    assert logits.shape == (2, 5, 64, 64)
    assert extras["pre_logits"].shape == (2, 256, h, h)
    assert extras["body"].shape == (2, 512, h, h)
    assert extras["sem_logits_small"].shape == (2, 5, h, h)
    atts = extras["attentions"]
    assert len(atts) == 5
    expected = [(64, 16), (128, 8), (256, 8 if output_stride == 8 else 4), (512, h)]
    for att, (c, s) in zip(atts[:4], expected):
        assert att.shape == (2, c, s, s)
    assert atts[4] is extras["pre_logits"]
    # logits are the bilinear upsampling of the small logits
    up = F.interpolate(extras["sem_logits_small"], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, up)
    logits.sum().backward()  # differentiable end to end


def test_forward_without_intermediate_has_pre_logits_only():
    model = small().eval()
    logits, extras = model(torch.randn(1, 3, 48, 40))
    assert logits.shape == (1, 5, 48, 40)
    assert set(extras) == {"pre_logits"}


def test_resnet50_shapes():
    torch.manual_seed(0)
    model = make_model(backbone="resnet50", norm_act="abn", output_stride=8, classes=[2], head_channels=16).eval()
    with torch.no_grad():
        logits, extras = model(torch.randn(1, 3, 32, 32), ret_intermediate=True)
    assert logits.shape == (1, 2, 32, 32)
    assert extras["body"].shape == (1, 2048, 4, 4)
    assert [a.shape[1] for a in extras["attentions"]] == [256, 512, 1024, 2048, 16]


def test_resnet101_shape_eval():
    model = make_model(backbone="resnet101", norm_act="iabn_sync", output_stride=16, classes=[16, 1]).eval()
    with torch.no_grad():
        logits, extras = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 17, 32, 32)
    assert extras["pre_logits"].shape == (1, 256, 2, 2)
    assert model.body.out_channels == 2048


# ---------------------------------------------------------------- state-dict layout
def expected_body_keys(structure, bottleneck):
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = ["mod1.conv1.weight"] + [f"mod1.bn1.{s}" for s in bn]
    n_conv = 3 if bottleneck else 2
    for stage, blocks in enumerate(structure):
        for b in range(1, blocks + 1):
            prefix = f"mod{stage + 2}.block{b}."
            for i in range(1, n_conv + 1):
                keys.append(prefix + f"convs.conv{i}.weight")
                keys += [prefix + f"convs.bn{i}.{s}" for s in bn]
            if b == 1 and (stage > 0 or bottleneck):  # stride 2 or channel change
                keys.append(prefix + "proj_conv.weight")
                keys += [prefix + f"proj_bn.{s}" for s in bn]
    return keys


def test_state_dict_keys_resnet101_reference_layout():
    from models.resnet import build_backbone

    body = build_backbone("resnet101", NORM_ACT["iabn_sync"], 16)
    assert list(body.state_dict()) == expected_body_keys((3, 4, 23, 3), True)
    assert body.mod2.block1.convs.conv1.weight.shape == (64, 64, 1, 1)
    assert body.mod2.block1.proj_conv.weight.shape == (256, 64, 1, 1)
    assert body.mod5.block3.convs.conv3.weight.shape == (2048, 512, 1, 1)
    assert body.mod4.block1.convs.conv2.stride == (2, 2) and body.mod5.block1.convs.conv2.stride == (1, 1)
    assert body.mod5.block2.convs.conv2.dilation == (2, 2)
    body8 = build_backbone("resnet101", NORM_ACT["abn"], 8)
    assert body8.mod4.block1.convs.conv2.stride == (1, 1) and body8.mod4.block5.convs.conv2.dilation == (2, 2)
    assert body8.mod5.block1.convs.conv2.dilation == (4, 4)


def test_state_dict_keys_full_model():
    model = small("iabn_sync")
    keys = list(model.state_dict())
    assert keys[:5] == ["body.mod1.conv1.weight", "body.mod1.bn1.weight", "body.mod1.bn1.bias",
                        "body.mod1.bn1.running_mean", "body.mod1.bn1.running_var"]
    assert [k[len("body."):] for k in keys if k.startswith("body.")] == expected_body_keys((2, 2, 2, 2), False)
    head = [k for k in keys if k.startswith("head.")]
    assert head == (["head.map_convs.0.weight", "head.map_convs.1.weight", "head.map_convs.2.weight",
                     "head.map_convs.3.weight"]
                    + [f"head.map_bn.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
                    + ["head.global_pooling_conv.weight"]
                    + [f"head.global_pooling_bn.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
                    + ["head.red_conv.weight", "head.pool_red_conv.weight"]
                    + [f"head.red_bn.{s}" for s in ("weight", "bias", "running_mean", "running_var")])
    assert keys[-4:] == ["cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"]
    assert not any("num_batches_tracked" in k for k in keys)
    assert model.head.map_convs[3].dilation == (18, 18)
    assert small(output_stride=8).head.map_convs[3].dilation == (32, 32)


def test_model_attributes():
    model = small(classes=(16, 1, 1), head_channels=32)
    assert isinstance(model, IncrementalSegmentationModule)
    assert model.classes == [16, 1, 1] and model.head_channels == 32 and model.output_stride == 16
    assert [c.out_channels for c in model.cls] == [16, 1, 1]
    assert all(c.in_channels == 32 and c.bias is not None for c in model.cls)
    n = sum(1 for _ in model.body_params()) + sum(1 for _ in model.head_params()) + sum(
        1 for _ in model.classifier_params())
    assert n == len(list(model.parameters()))
    assert len(list(model.old_classifier_params())) == 4 and len(list(model.new_classifier_params())) == 2


@pytest.mark.parametrize("bad", [dict(backbone="resnet34"), dict(norm_act="gn"), dict(output_stride=4)])
def test_make_model_bad_options(bad):
    kwargs = dict(backbone="resnet18", norm_act="abn", output_stride=16, classes=[2]) | bad
    with pytest.raises(UserError):
        make_model(**kwargs)


# ---------------------------------------------------------------- pretrained loading
def write_inplace_abn_file(path, body, prefix="module.", wrap=True, with_fc=True):
    torch.manual_seed(1)
    state = {}
    for k, v in body.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        t = torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v)
        state[prefix + k] = t
    if with_fc:
        state[prefix + "classifier.fc.weight"] = torch.randn(1000, 512)
        state[prefix + "classifier.fc.bias"] = torch.randn(1000)
    torch.save({"state_dict": state} if wrap else state, path)
    return {k[len(prefix):]: v for k, v in state.items() if "classifier" not in k}


@pytest.mark.parametrize("prefix,wrap", [("module.", True), ("", True), ("", False), ("module.", False)])
def test_pretrained_loading_layouts(tmp_path, prefix, wrap):
    path = str(tmp_path / "resnet18_iabn_sync.pth.tar")
    written = write_inplace_abn_file(path, small().body, prefix=prefix, wrap=wrap)
    model = make_model(backbone="resnet18", norm_act="iabn_sync", output_stride=16, classes=[3],
                       pretrained_path=path)
    loaded = model.body.state_dict()
    assert set(loaded) == set(written)
    for k, v in written.items():
        assert torch.equal(loaded[k], v), k


def test_pretrained_loading_std_norm_adds_num_batches_tracked(tmp_path):
    path = str(tmp_path / "w.pth.tar")
    written = write_inplace_abn_file(path, small().body)
    model = small("std", pretrained_path=path)
    state = model.body.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    for k, v in written.items():
        assert torch.equal(state[k], v)


def test_pretrained_missing_file_is_user_error(tmp_path):
    path = str(tmp_path / "nope" / "resnet101_iabn_sync.pth.tar")
    with pytest.raises(UserError) as err:
        small(pretrained_path=path)
    msg = str(err.value)
    assert path in msg and "--no_pretrained" in msg and "\n" not in msg


def test_pretrained_key_mismatch_is_user_error(tmp_path):
    path = str(tmp_path / "w.pth.tar")
    write_inplace_abn_file(path, small().body)
    with pytest.raises(UserError) as err:  # resnet18 weights into a resnet50 body
        make_model(backbone="resnet50", norm_act="abn", output_stride=16, classes=[2], pretrained_path=path)
    assert path in str(err.value) and "--no_pretrained" in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "garbage.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_pretrained_body(small().body, str(bad))


# ---------------------------------------------------------------- ABN maths
def hand_abn(x, weight, bias, mean, var, eps, slope, use_abs):
    scale = weight.abs() + eps if use_abs else weight
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    y = y * scale[None, :, None, None] + bias[None, :, None, None]
    return torch.where(y >= 0, y, y * slope) if slope is not None else y


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,use_abs", [("iabn", True), ("iabn_sync", True), ("abn", False)])
def test_abn_forward_matches_hand_computation(name, use_abs, training):
    torch.manual_seed(0)
    layer = NORM_ACT[name](4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.5, 0.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        layer.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0, 1.0]))
        layer.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    layer.train(training)
    x = torch.randn(3, 4, 5, 6)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    out = layer(x.clone())  # In-Place ABN (when installed) overwrites its input
    if training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() / 4
        torch.testing.assert_close(layer.running_mean, 0.9 * rm + 0.1 * mean)
        torch.testing.assert_close(layer.running_var, 0.9 * rv + 0.1 * var * n / (n - 1))
    else:
        mean, var = rm, rv
    expected = hand_abn(x, layer.weight.detach(), layer.bias.detach(), mean, var, 1e-5, 0.01, use_abs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert layer.activation == "leaky_relu" and layer.activation_param == 0.01
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]


def test_abn_identity_and_weight_gradient_sign():
    torch.manual_seed(0)
    layer = ABN(3, activation="identity", abs_weight=True).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    x = torch.randn(2, 3, 4, 4)
    out = layer(x)
    expected = hand_abn(x, layer.weight.detach(), layer.bias.detach(), layer.running_mean, layer.running_var,
                        1e-5, None, True)
    torch.testing.assert_close(out, expected)
    dy = torch.randn_like(out)
    out.backward(dy)
    xhat = x / math.sqrt(1 + 1e-5)
    sum_xhat_dy = (xhat * dy).sum(dim=(0, 2, 3))
    # In-Place ABN: d/dw = sign(w) * sum(xhat * dy) with sign(0) = +1
    torch.testing.assert_close(layer.weight.grad, sum_xhat_dy * torch.tensor([-1.0, 1.0, 1.0]))
    torch.testing.assert_close(layer.bias.grad, dy.sum(dim=(0, 2, 3)))


def test_std_norm_is_batchnorm_plus_leaky_relu():
    layer = NORM_ACT["std"](4)
    assert isinstance(layer, BatchNormAct) and isinstance(layer, torch.nn.BatchNorm2d)
    assert layer.activation == "leaky_relu" and layer.activation_param == 0.01
    x = torch.randn(2, 4, 3, 3)
    bn = torch.nn.BatchNorm2d(4)
    torch.testing.assert_close(layer(x), F.leaky_relu(bn(x), 0.01))
    assert is_norm_layer(layer) and is_norm_layer(ABN(2)) and not is_norm_layer(torch.nn.Conv2d(1, 1, 1))


def test_residual_block_last_returns_pre_activation():
    torch.manual_seed(0)
    block = ResidualBlock(8, [4, 4, 16], NORM_ACT["abn"], stride=2, last=True).eval()
    assert block.convs.bn3.activation == "identity" and block.proj_bn.activation == "identity"
    x = torch.randn(1, 8, 8, 8)
    out, pre = block(x)
    expected_pre = block.convs(x) + block.proj_bn(block.proj_conv(x))
    torch.testing.assert_close(pre, expected_pre)
    torch.testing.assert_close(out, F.leaky_relu(expected_pre, 0.01))
    assert out.shape == (1, 16, 4, 4)
    plain = ResidualBlock(16, [8, 16], NORM_ACT["abn"]).eval()  # basic block, identity shortcut
    assert plain.proj_conv is None
    y = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(plain(y), F.leaky_relu(plain.convs(y) + y, 0.01))


# ---------------------------------------------------------------- image pooling
def test_image_pooling_train_and_eval_window():
    torch.manual_seed(0)
    head = DeeplabV3(8, 4, 4, out_stride=16, norm_act=NORM_ACT["abn"], pooling_size=3)
    x = torch.randn(2, 8, 6, 5)
    head.train()
    torch.testing.assert_close(head._global_pooling(x), x.mean(dim=(2, 3), keepdim=True))
    head.eval()
    pooled = head._global_pooling(x)
    assert pooled.shape == x.shape
    # window 3x3, stride 1 -> (4, 3) valid positions, replicate-padded by 1 on every side
    for i in range(6):
        for j in range(5):
            ci, cj = min(max(i, 1), 4), min(max(j, 1), 3)
            window = x[:, :, ci - 1:ci + 2, cj - 1:cj + 2].mean(dim=(2, 3))
            torch.testing.assert_close(pooled[:, :, i, j], window)
    # even window (2): left/top pad 0, right/bottom pad 1
    head.pooling_size = 2
    pooled = head._global_pooling(x)
    torch.testing.assert_close(pooled[:, :, 0, 0], x[:, :, 0:2, 0:2].mean(dim=(2, 3)))
    torch.testing.assert_close(pooled[:, :, 5, 4], x[:, :, 4:6, 3:5].mean(dim=(2, 3)))
    # window larger than the map = global mean everywhere; None = global mean
    for size in (32, None):
        head.pooling_size = size
        pooled = head._global_pooling(x)
        torch.testing.assert_close(pooled.expand_as(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    head.pooling_size = 32
    assert head(x).shape == (2, 4, 6, 5)


def test_head_init_xavier_gain():
    torch.manual_seed(0)
    head = DeeplabV3(512, 256, 256, norm_act=NORM_ACT["abn"])
    w = head.map_convs[0].weight
    gain = math.sqrt(2.0 / (1 + 0.01 ** 2))
    std = gain * math.sqrt(2.0 / (512 + 256))
    assert abs(w.std().item() - std) / std < 0.05
    assert torch.all(head.red_bn.weight == 1) and torch.all(head.red_bn.bias == 0)


# ---------------------------------------------------------------- fix_bn
def test_fix_bn_survives_train():
    model = small("iabn_sync")
    model.fix_bn()
    model.train()
    norms = list(model.norm_layers())
    assert len(norms) > 10
    assert all(not m.training for m in norms)
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in norms)
    assert model.cls[0].training and model.body.mod1.conv1.training and model.body.mod1.conv1.weight.requires_grad
    before = model.body.mod1.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.body.mod1.bn1.running_mean, before)  # statistics frozen too
    model.eval()
    assert not model.cls[0].training
    model.train()
    assert all(not m.training for m in model.norm_layers()) and model.cls[0].training


def test_without_fix_bn_train_updates_statistics():
    model = small().train()
    before = model.body.mod1.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(model.body.mod1.bn1.running_mean, before)


# ---------------------------------------------------------------- synchronised ABN without the package (gloo, 2 processes)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank, world, port, x, dy, weight, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        layer = ABNSync(x.shape[1], abs_weight=True).train()
        with torch.no_grad():
            layer.weight.copy_(weight)
        xs = x.chunk(world)[rank].clone().requires_grad_(True)
        out = layer(xs)
        out.backward(dy.chunk(world)[rank])
        torch.save({"out": out.detach(), "dx": xs.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
                    "rm": layer.running_mean, "rv": layer.running_var}, os.path.join(result_dir, f"{rank}.pt"))
        dist.barrier()  # nobody tears gloo down while the peer is still communicating
    finally:
        dist.destroy_process_group()


def test_abn_sync_matches_full_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    dy = torch.randn(4, 3, 5, 5)
    weight = torch.tensor([0.7, -1.2, 0.0])
    try:
        mp.spawn(_sync_worker, args=(2, _free_port(), x, dy, weight, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException:
        # gloo occasionally aborts while tearing down after the work is done; only the saved results matter here
        if not all((tmp_path / f"{r}.pt").exists() for r in range(2)):
            raise
    ref = ABN(3, abs_weight=True).train()
    with torch.no_grad():
        ref.weight.copy_(weight)
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    out.backward(dy)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["out"] for r in res]), out.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), xr.grad, atol=1e-5, rtol=1e-4)
    # each rank holds the gradient of its own share; DDP averages them, so the sum equals the full-batch gradient
    torch.testing.assert_close(res[0]["dw"] + res[1]["dw"], ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res[0]["db"] + res[1]["db"], ref.bias.grad, atol=1e-4, rtol=1e-4)
    for r in res:
        torch.testing.assert_close(r["rm"], ref.running_mean)
        torch.testing.assert_close(r["rv"], ref.running_var)


def test_the_run_record_names_the_norm_layer_code_that_runs():
    """docs/deviations.md: the pure-PyTorch ABN matches inplace_abn to float32 rounding, not bit for bit, so the
    run record says which code computed the norm layers."""
    from modules import norm

    abn = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3])
    assert norm.describe_norm_layers(abn) == "pure-PyTorch ABN"
    std = make_model(backbone="resnet18", norm_act="std", output_stride=16, classes=[3])
    assert norm.describe_norm_layers(std) == "torch BatchNormAct"
    sync = make_model(backbone="resnet18", norm_act="iabn_sync", output_stride=16, classes=[3])
    if norm.HAS_INPLACE_ABN:
        assert norm.describe_norm_layers(sync).startswith("inplace_abn ")
    else:
        assert norm.describe_norm_layers(sync) == "pure-PyTorch ABNSync (|weight| + eps scale, as InPlaceABN)"
