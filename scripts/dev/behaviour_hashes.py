"""Fingerprint of the framework's behaviour: SHA-256 of the checkpoints, result CSVs and AWT masks of a two-step run
of every preset, with and without ``--att 25 --mask_att``, on a small synthetic VOC.

    python scripts/dev/behaviour_hashes.py OUT_DIR HASHES.txt [--presets-only]

SSUL, SSUL-M, RCIL and DropClass (on MiB and PLOP) run too, each with and without AWT, unless ``--presets-only``.

Run it before and after a change that must not change behaviour and ``diff`` the two outputs. The runs write under
``OUT_DIR`` (same folder both times: the checkpoints store the resolved configuration, paths included). Files are
hashed byte for byte, except the AWT scores file, whose metadata records the wall-clock time of the attribution
(there the scores and the metadata without ``seconds`` are hashed), the checkpoints, which also store the resolved
configuration, so that any new flag changes their bytes (there the weights and the trainer state are hashed), and
the ``.run.json`` run records (configuration and timings; skipped).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import run  # noqa: E402
from dataset.synthetic import generate  # noqa: E402

PRESETS = ["FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP"]
# (run name, flags) of the methods that change the model, the data or the losses' wiring
PLUGINS = [("SSUL", ["--method", "SSUL"]), ("SSUL-M", ["--method", "SSUL-M", "--mem_size", "8"]),
           ("RCIL", ["--method", "RCIL"]), ("MiB_DropClass", ["--method", "MiB", "--dropclass"]),
           ("PLOP_DropClass", ["--method", "PLOP", "--dropclass"])]


def _args(data, out, method, awt, flags=None):
    name = method + ("_AWT" if awt else "")
    extra = (["--att", "25", "--mask_att"] if awt else []) + list(flags or ["--method", method])
    return ["--dataset", "voc", "--data_root", data, "--task", "15-5", "--step", "0", "1", "--backbone",
            "resnet18", "--no_pretrained", "--norm_act", "abn", "--crop_size", "32", "--batch_size", "8",
            "--epochs", "1", "--num_workers", "0", "--no_progress", "--visualize", "--overlap",
            "--checkpoint", os.path.join(out, "ckpt"), "--results_dir", os.path.join(out, "results"),
            "--logdir", os.path.join(out, "logs"), "--cache_root", os.path.join(out, "cache"),
            "--channels_dir", os.path.join(out, "channels"), "--date", "fixed",
            "--name", name, "--lr", "0.01", "0.001", *extra]


def _digest(path):
    if path.endswith("_scores.pt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = {k: v for k, v in obj.get("meta", {}).items() if k != "seconds"}
        h = hashlib.sha256(repr(sorted(meta.items())).encode())
        for key in ("scores", "n_used", "n_skipped"):
            h.update(obj[key].numpy().tobytes())
        return h.hexdigest()
    if path.endswith(".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        h = hashlib.sha256()
        for key, tensor in sorted(obj["model_state"].items()):
            h.update(key.encode())
            h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        h.update(repr(obj.get("trainer_state", {})).encode())
        return h.hexdigest()
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def main(out, listing):
    torch.set_num_threads(2)

    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)
    data = os.path.join(out, "PascalVOC12")
    generate(data, "voc", size=32, n_train=120, n_val=48, seed=0)
    for method in PRESETS:
        for awt in (False, True):
            code = run.main(_args(data, out, method, awt))
            if code != 0:
                raise SystemExit(f"{method} awt={awt}: exit {code}")
    if "--presets-only" not in sys.argv:
        for name, flags in PLUGINS:
            for awt in (False, True):
                code = run.main(_args(data, out, name, awt, flags))
                if code != 0:
                    raise SystemExit(f"{name} awt={awt}: exit {code}")
    lines = []
    for sub in ("ckpt", "results", "channels"):
        for folder, _, files in sorted(os.walk(os.path.join(out, sub))):
            for name in sorted(files):
                if name.endswith(".run.json"):
                    continue
                path = os.path.join(folder, name)
                lines.append(f"{_digest(path)} {os.path.relpath(path, out)}\n")
    with open(listing, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
