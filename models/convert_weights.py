"""Convert ImageNet weights of a transformer backbone into this framework's file, offline.

    python -m models.convert_weights --backbone mit_b2 mit_b2.pth pretrained/mit_b2.pth
    python -m models.convert_weights --backbone swin_t path/to/hf-checkpoint-folder pretrained/swin_t.pth
    python -m models.convert_weights --backbone swin_b_w12 swin_base_patch4_window12_384.pth pretrained/swin_b_w12.pth

Sources (pretrained/README.md says where to get them):

* MiT: the official ``mit_b*.pth`` of NVlabs' SegFormer (keys ``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``,
  ...; its ImageNet ``head.*`` is dropped), mapped key by key here.
* Swin: the official ``swin_*.pth`` of microsoft/Swin-Transformer (e.g. ``swin_base_patch4_window12_384.pth`` for
  ``swin_b_w12``, NeST's), mapped key by key (``qkv`` split; ``head.*`` and the recomputed
  ``relative_position_index`` / ``attn_mask`` buffers dropped; the per-stage norms keep weight 1, bias 0).
* any of them as a ``transformers`` checkpoint folder (``config.json`` and ``model.safetensors`` or
  ``pytorch_model.bin``, e.g. a local copy of ``nvidia/mit-b2``, ``microsoft/swin-tiny-patch4-window7-224`` or
  ``facebook/convnext-tiny-224``): loaded offline by ``transformers`` itself (``from_pretrained`` with
  ``local_files_only``), which also renames the keys of checkpoints written by older versions. The backbone classes'
  per-stage norms are not in those files and keep their initialisation (weight 1, bias 0), as ``transformers``
  builds a backbone from them.

The output holds ``net.*`` keys in the layout of the installed ``transformers`` (its module names) and loads
strictly into ``--backbone NAME`` (``models.hierarchical.load_converted``); the conversion checks that before writing.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from models.hierarchical import STAGES, VARIANTS, HierarchicalBackbone, require_transformers
from utils.checkpoint import safe_load
from utils.errors import UserError, one_line
from utils.io import atomic_write

# official MiT block keys -> transformers (>= 5) SegformerModel keys inside stages.{stage}.blocks.{index}.
_MIT_BLOCK = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "attn.q.": "attention.q_proj.",
              "attn.proj.": "attention.o_proj.", "attn.sr.": "attention.sequence_reduction.sequence_reduction.",
              "attn.norm.": "attention.sequence_reduction.layer_norm.", "mlp.fc1.": "mlp.fc1.",
              "mlp.fc2.": "mlp.fc2.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv."}


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a ``.pth``/``.bin`` file (possibly under ``state_dict`` / ``model``)."""
    if not os.path.isfile(path):
        raise UserError(f"source weights {path} do not exist")
    state = safe_load(path, "source weights")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"source weights {path} hold no state dict")
    return state


def load_transformers_folder(name: str, folder: str) -> dict[str, torch.Tensor]:
    """The backbone's ``net`` state from a local ``transformers`` checkpoint folder, loaded by ``transformers``."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder} holds no config.json: give a transformers checkpoint folder or an official file")
    kind = VARIANTS[name][0]
    tf = require_transformers()
    try:
        if kind == "segformer":
            net = tf.SegformerModel.from_pretrained(folder, local_files_only=True)
        else:
            cls = tf.SwinBackbone if kind == "swin" else tf.ConvNextBackbone
            net = cls.from_pretrained(folder, local_files_only=True, out_features=list(STAGES))
    except (OSError, ValueError) as exc:
        raise UserError(f"transformers could not load {folder} ({one_line(exc)})") from None
    return net.state_dict()


def _block_key(out: dict, prefix: str, rest: str, value: torch.Tensor, *, fused: str, parts: tuple[str, ...],
               table: dict[str, str], what: str) -> None:
    """One official transformer-block key (``rest`` inside the block at ``prefix``) into ``out``: a fused projection
    (``fused``: MiT's kv, Swin's qkv) split in equal row blocks into ``attention.{part}``, any other key renamed by
    the first prefix of ``table`` it starts with."""
    if rest.startswith(fused):
        rows = value.shape[0] // len(parts)
        for i, part in enumerate(parts):
            out[f"{prefix}attention.{part}.{rest[len(fused):]}"] = value[i * rows:(i + 1) * rows]
        return
    old = next((o for o in table if rest.startswith(o)), None)
    if old is None:
        raise UserError(f"unknown key {what}")
    out[prefix + table[old] + rest[len(old):]] = value


def mit_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs' mix_transformer keys -> ``SegformerModel`` keys (``kv`` split into key and value)."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)", key):
            part = "proj" if m[2] == "proj" else "layer_norm"
            out[f"stages.{int(m[1]) - 1}.patch_embeddings.{part}.{m[3]}"] = value
        elif m := re.fullmatch(r"norm(\d)\.(weight|bias)", key):
            out[f"stages.{int(m[1]) - 1}.layer_norm.{m[2]}"] = value
        elif m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key):
            _block_key(out, f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", m[3], value, fused="attn.kv.",
                       parts=("k_proj", "v_proj"), table=_MIT_BLOCK, what=f"{key} in an official MiT file")
        else:
            raise UserError(f"unknown key {key} in an official MiT file")
    return out


# official Swin block keys (microsoft/Swin-Transformer models/swin_transformer.py) -> transformers (>= 5) SwinBackbone
# keys inside swin.encoder.layers.{stage}.blocks.{index}.
_SWIN_BLOCK = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
               "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
               "attn.proj.": "attention.o_proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
# the ImageNet classifier and the buffers the model recomputes
_SWIN_SKIPPED = re.compile(r"(head\..*|.*relative_position_index|.*attn_mask)")


def swin_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft's Swin keys (``patch_embed.proj.weight``, ``layers.0.blocks.0.attn.qkv.weight``, ...) ->
    ``SwinBackbone`` keys (``qkv`` split into q, k and v). The classification model's final ``norm`` goes to the
    backbone's ``swin.layernorm``, which its stage outputs do not use (they pass through the per-stage norms)."""
    out = {}
    for key, value in state.items():
        if _SWIN_SKIPPED.fullmatch(key):
            continue
        if m := re.fullmatch(r"patch_embed\.(proj|norm)\.(weight|bias)", key):
            part = "patch_embeddings.projection" if m[1] == "proj" else "norm"
            out[f"swin.embeddings.{part}.{m[2]}"] = value
        elif m := re.fullmatch(r"norm\.(weight|bias)", key):
            out[f"swin.layernorm.{m[1]}"] = value
        elif m := re.fullmatch(r"layers\.(\d)\.downsample\.(reduction|norm)\.(weight|bias)", key):
            out[f"swin.encoder.layers.{m[1]}.downsample.{m[2]}.{m[3]}"] = value
        elif m := re.fullmatch(r"layers\.(\d)\.blocks\.(\d+)\.(.+)", key):
            _block_key(out, f"swin.encoder.layers.{m[1]}.blocks.{m[2]}.", m[3], value, fused="attn.qkv.",
                       parts=("q_proj", "k_proj", "v_proj"), table=_SWIN_BLOCK, what=f"{key} in an official Swin file")
        else:
            raise UserError(f"unknown key {key} in an official Swin file")
    return out


OFFICIAL = {"segformer": mit_from_official, "swin": swin_from_official}


def convert(name: str, source: str) -> dict[str, torch.Tensor]:
    """``source`` (an official MiT file or a transformers checkpoint folder) -> this framework's ``net.*`` state of
    ``--backbone name``, checked against a freshly built backbone (keys and shapes)."""
    if name not in VARIANTS:
        raise UserError(f"--backbone {name} is not a transformer backbone; choose one of {', '.join(VARIANTS)}")
    if os.path.isdir(source):
        net_state = load_transformers_folder(name, source)
    elif VARIANTS[name][0] in OFFICIAL:
        net_state = OFFICIAL[VARIANTS[name][0]](read_state_file(source))
    else:
        raise UserError(f"--backbone {name} converts from a transformers checkpoint folder (config.json + weights), "
                        f"not the file {source}")
    body = HierarchicalBackbone(name)
    own = body.net.state_dict()
    for key, value in own.items():  # the backbone classes' stage norms, absent from classification checkpoints
        if key.startswith("hidden_states_norms.") and key not in net_state:
            net_state[key] = value
    missing = [k for k in own if k not in net_state]
    unexpected = [k for k in net_state if k not in own]
    shapes = [k for k in own if k in net_state and tuple(net_state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{what} {len(keys)} (first {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise UserError(f"the source does not fit --backbone {name}: {'; '.join(parts)}; is it the {name} checkpoint?")
    return {f"net.{k}": v.detach().to(own[k].dtype).clone() for k, v in net_state.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, choices=list(VARIANTS))
    parser.add_argument("source", help="official or transformers checkpoint (file or folder)")
    parser.add_argument("output", help="where to write the framework's file, e.g. pretrained/mit_b2.pth")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.output):
            raise UserError(f"{args.output} exists; remove it or choose another output path")
        state = convert(args.backbone, args.source)
        with atomic_write(args.output, "wb") as handle:
            torch.save(state, handle)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(state)} tensors for --backbone {args.backbone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
