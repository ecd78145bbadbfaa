"""AWT: Attribution-aware Weight Transfer (Goswami et al., WACV 2023). See docs/awt.md."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import UserError

log = logging.getLogger(__name__)

IGNORED = "(ignored: dead flag in the reference code, accepted so published command lines run) "


def add_awt_args(parser: argparse.ArgumentParser) -> None:
    """Declare the AWT flags (reference names and defaults, plus this framework's own) in the group "AWT"."""
    g = parser.add_argument_group("AWT")
    g.add_argument("--init_balanced", action="store_true", default=False,
                   help="MiB initialisation of the new classifier (new weight := bg weight, biases := b_bg - log(N+1))")
    g.add_argument("--orig_init", action="store_true", default=False,
                   help="MiB initialisation (weight copy + bias trick); with --att the bg weight is added twice on "
                        "the selected channels, as in the reference")
    g.add_argument("--copy_bias", action="store_true", default=False,
                   help="with a channel mask: new and bg bias := b_bg - log(N_new+1)")
    g.add_argument("--copy", action="store_true", default=False,
                   help="selected channels are replaced by the bg weight instead of added to the random init")
    g.add_argument("--copy_share", type=float, default=0.0, help=IGNORED + "(passed but unused in AWT)")
    g.add_argument("--mask_att", action="store_true", default=False,
                   help="restrict attributions to the pixels of the step's new classes (absent: whole image)")
    g.add_argument("--mean_after_max", action="store_true", default=False,
                   help="aggregation: per-image max over positions, then mean over images")
    g.add_argument("--mean_after_avg", action="store_true", default=False,
                   help="aggregation: per-image spatial average, then mean over images")
    g.add_argument("--avg_after_mean", action="store_true", default=False,
                   help="aggregation: mean over images, then spatial average (default: mean over images, then max)")
    g.add_argument("--att", type=float, default=0.0,
                   help="percentage of classifier-input channels to transfer, in (0, 100]; 0 = no attribution "
                        "(10/25/50/75 select 26/64/128/192 of 256 channels)")
    g.add_argument("--no_att", action="store_true", default=False,
                   help="no attribution and no classifier initialisation at all (new classifier stays random)")
    g.add_argument("--random_channels", action="store_true", default=False,
                   help="ablation: transfer the bg weight on --rand random channels instead of attributed ones")
    g.add_argument("--rand", type=int, default=0, help="number of random channels for --random_channels (a count)")
    g.add_argument("--attribution", default="exact", choices=["exact", "captum"],
                   help="exact: closed-form Integrated Gradients (the attributed function is affine in the "
                        "classifier input); captum: Captum LayerIntegratedGradients as in the reference")
    g.add_argument("--ig_steps", type=int, default=None,
                   help="Integrated-Gradients steps for --attribution captum (default: 30 on ADE, 50 elsewhere)")
    g.add_argument("--ig_batch_size", type=int, default=8,
                   help="Captum internal batch size (interpolation points per backbone pass)")
    g.add_argument("--att_max_images", type=int, default=None,
                   help="cap on the images used for attribution (default: 2000 on ADE, 5000 on ADE task 50, "
                        "else all)")
    g.add_argument("--channels_dir", default="channels", help="folder of the AWT channel masks (see docs/awt.md)")
    g.add_argument("--att_plot", action="store_true", default=False,
                   help="also write a PNG of the sorted channel scores with the selected channels marked")
    g.add_argument("--att_accumulate_classes", action="store_true", default=False,
                   help="per-class masks: accumulate attributions across classes like the released "
                        "attribute_class.py (class k uses classes 1..k); default resets per class")
    g.add_argument("--att_per_class", action="store_true", default=False,
                   help="run.py: use (and compute if missing) one channel mask per new class, as written by "
                        "attribute_class.py, instead of one mask for the union of the new classes")


# ================================================================================================ flag resolution
AGGREGATIONS = ("max_after_mean", "mean_after_max", "mean_after_avg", "avg_after_mean")

# The reference's per-dataset choices, in one place: (ig_steps, max_images) per dataset, then per-task overrides.
ATTRIBUTION_DEFAULTS = {
    "ade": {"ig_steps": 30, "max_images": 2000, "tasks": {"50": {"max_images": 5000}}},
    "voc": {"ig_steps": 50, "max_images": None},
    "cityscapes": {"ig_steps": 50, "max_images": None},
}
_FALLBACK_DEFAULTS = {"ig_steps": 50, "max_images": None}


def dataset_defaults(dataset: str, task: str) -> dict:
    """``{"ig_steps": int, "max_images": int | None}``: the reference's choices for this dataset and task."""
    entry = ATTRIBUTION_DEFAULTS.get(dataset, _FALLBACK_DEFAULTS)
    out = {"ig_steps": entry["ig_steps"], "max_images": entry["max_images"]}
    out.update(entry.get("tasks", {}).get(str(task), {}))
    return out


def resolved_ig_steps(cfg) -> int:
    return int(cfg.ig_steps) if cfg.ig_steps is not None else dataset_defaults(cfg.dataset, cfg.task)["ig_steps"]


def resolved_max_images(cfg) -> int | None:
    if cfg.att_max_images is not None:
        return int(cfg.att_max_images)
    return dataset_defaults(cfg.dataset, cfg.task)["max_images"]


def aggregation_name(cfg) -> str:
    """The aggregation chosen by the reference flags (default: mean over images, then max over positions)."""
    chosen = [name for name in AGGREGATIONS[1:] if getattr(cfg, name, False)]
    if len(chosen) > 1:
        raise UserError("--" + " and --".join(chosen) + " are mutually exclusive aggregation variants; pass at most one")
    return chosen[0] if chosen else "max_after_mean"


def validate_awt_args(cfg) -> None:
    """Reject impossible AWT flag values with one-line messages."""
    att = float(cfg.att)
    if att != 0 and not (0 < att <= 100):
        raise UserError(f"--att {cfg.att:g} is outside (0, 100]: it is the percentage of classifier-input channels "
                        "to transfer (e.g. --att 25); 0 disables the attribution")
    aggregation_name(cfg)
    if cfg.random_channels and not cfg.no_att and cfg.rand <= 0:
        raise UserError(f"--random_channels needs --rand K with K > 0 channels (got --rand {cfg.rand})")
    if cfg.ig_steps is not None and cfg.ig_steps < 1:
        raise UserError(f"--ig_steps must be positive, got {cfg.ig_steps}")
    if cfg.ig_batch_size < 1:
        raise UserError(f"--ig_batch_size must be positive, got {cfg.ig_batch_size}")
    if cfg.att_max_images is not None and cfg.att_max_images < 1:
        raise UserError(f"--att_max_images must be positive, got {cfg.att_max_images}")


def num_selected_channels(att: float, channels: int) -> int:
    """round(att / 100 * C), half rounded up, at least 1: 10/25/50/75 % of 256 -> 26/64/128/192."""
    att = float(att)
    if not (0 < att <= 100):
        raise UserError(f"--att {att:g} is outside (0, 100]")
    return max(1, min(channels, int(math.floor(att * channels / 100.0 + 0.5))))


def select_top_channels(scores: Tensor, att: float) -> Tensor:
    """Bool mask of the top round(att/100 * C) channels of ``scores`` (``[C]`` or ``[N, C]``, one top-k per row).

    Ties are broken towards the lower channel index (stable sort), so equal scores select the same channels in
    every implementation."""
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [C] or [N, C], got shape {tuple(scores.shape)}")
    rows = scores.reshape(-1, scores.shape[-1]).detach().float().cpu()
    k = num_selected_channels(att, rows.shape[1])
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)


def random_channel_mask(cfg, channels: int) -> Tensor:
    """Float ``[C]`` mask with ``--rand`` ones, drawn from a torch Generator seeded with ``--random_seed``."""
    k = int(cfg.rand)
    if not (0 < k <= channels):
        raise UserError(f"--rand {k} must be between 1 and the {channels} classifier-input channels")
    gen = torch.Generator().manual_seed(int(cfg.random_seed))
    mask = torch.zeros(channels)
    mask[torch.randperm(channels, generator=gen)[:k]] = 1.0
    return mask


def classifier_init_plan(cfg) -> dict | None:
    """How the new classifier is initialised at step > 0; None = it keeps its random init.

    Returns ``{"mask_source": "attribution" | "random" | None, "orig_init", "copy", "copy_bias"}``; the last three
    are the keyword arguments of ``init_new_classifier`` and ``mask_source`` says where its ``channel_mask`` comes
    from (resolved by :func:`prepare_new_classifier`). Rules (docs/awt.md, "Initialisation variants"):
    ``--no_att`` -> None; ``--att > 0`` or ``--random_channels`` -> masked transfer (``--random_channels`` wins,
    ``--orig_init`` respected); else ``--orig_init`` or ``--init_balanced`` -> MiB init; else None."""
    validate_awt_args(cfg)
    if cfg.no_att:
        return None
    if cfg.random_channels or float(cfg.att) > 0:
        return {"mask_source": "random" if cfg.random_channels else "attribution", "orig_init": bool(cfg.orig_init),
                "copy": bool(cfg.copy), "copy_bias": bool(cfg.copy_bias)}
    if cfg.orig_init or cfg.init_balanced:
        return {"mask_source": None, "orig_init": True, "copy": False, "copy_bias": False}
    return None


# ================================================================================================ mask files
def _data_key(cfg) -> str:
    """Short stable hash of the data settings that change the mask but are not spelled out in the file name."""
    settings = {"random_seed": int(cfg.random_seed), "crop_size": int(cfg.crop_size),
                "max_images": resolved_max_images(cfg), "overlap": bool(cfg.overlap),
                "data_masking": str(cfg.data_masking), "data_root": os.path.normpath(str(cfg.data_root))}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def channels_path(cfg, step: int, *, per_class: bool = False) -> str:
    """Where the channel mask of ``step`` lives; a function of the configuration only.

    ``{channels_dir}/{task}-{dataset}_{name}/step{t}_{union|class}_att{att}_{aggregation}[_nomask][_cum]_{key}.pt``
    where ``_nomask`` marks attributions over whole images (no ``--mask_att``), ``_cum`` per-class masks with
    ``--att_accumulate_classes`` and ``key`` is an 8-hex hash of the data settings (seed, crop, image cap, overlap,
    label masking, data root)."""
    kind = "class" if per_class else "union"
    parts = [f"step{int(step)}", kind, f"att{float(cfg.att):g}", aggregation_name(cfg)]
    if not cfg.mask_att:
        parts.append("nomask")
    if per_class and cfg.att_accumulate_classes:
        parts.append("cum")
    parts.append(_data_key(cfg))
    return os.path.join(str(cfg.channels_dir), f"{cfg.task}-{cfg.dataset}_{cfg.name}", "_".join(parts) + ".pt")


def scores_path(mask_path: str) -> str:
    """The scores and metadata written next to a mask file."""
    return mask_path[:-3] + "_scores.pt" if mask_path.endswith(".pt") else mask_path + "_scores.pt"


def plot_path(mask_path: str) -> str:
    return mask_path[:-3] + "_scores.png" if mask_path.endswith(".pt") else mask_path + "_scores.png"


def classifier_fingerprint(model) -> str:
    """sha1 of the background classifier's weights: identifies the old model a mask was computed from."""
    m = _unwrap(model).cls[0]
    data = torch.cat([m.weight.detach().float().cpu().flatten(), m.bias.detach().float().cpu().flatten()])
    return hashlib.sha1(data.numpy().tobytes()).hexdigest()


def load_mask(path: str, channels: int, n_new: int | None = None, *, model_old=None) -> Tensor:
    """Read a mask file: bool ``[C]`` (``n_new`` None) or ``[n_new, C]``; reference ``[..., 1, 1]`` shapes accepted.

    With ``model_old`` and a scores file next to the mask, the recorded classifier fingerprint must match."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the user's file
        raise UserError(f"cannot read the AWT channel mask {path} ({type(exc).__name__}); delete it to recompute") \
            from exc
    if not torch.is_tensor(obj):
        raise UserError(f"AWT channel mask {path} holds a {type(obj).__name__}, not a tensor; delete it to recompute")
    mask = obj
    while mask.dim() > 1 and tuple(mask.shape[-2:]) == (1, 1):
        mask = mask[..., 0, 0]
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise UserError(f"AWT channel mask {path} is not a boolean mask (dtype {mask.dtype}); delete it to "
                            "recompute")
        mask = mask != 0
    expected = (channels,) if n_new is None else (n_new, channels)
    if tuple(mask.shape) != expected:
        raise UserError(f"AWT channel mask {path} has shape {list(obj.shape)} but this model needs {list(expected)} "
                        f"({'one mask' if n_new is None else f'{n_new} new classes x'} {channels} channels); "
                        "delete it or check --task/--step/--att_per_class")
    if model_old is not None and os.path.isfile(scores_path(path)):
        try:
            meta = torch.load(scores_path(path), map_location="cpu", weights_only=True).get("meta", {})
        except Exception:  # noqa: BLE001 - the scores file is informative only
            meta = {}
        recorded = meta.get("old_classifier_sha1")
        if recorded and recorded != classifier_fingerprint(model_old):
            raise UserError(f"AWT channel mask {path} was computed from a different previous-step model (background "
                            "classifier fingerprint differs); delete it to recompute, or use another --channels_dir")
    return mask.cpu()


def write_mask(path: str, mask: Tensor, result: "AttributionResult | None" = None, meta: dict | None = None,
               *, plot: bool = False) -> None:
    """Atomically write the mask (CPU bool), the scores next to it, and optionally the PNG."""
    from utils.io import atomic_save_torch

    atomic_save_torch(mask.detach().cpu().bool(), path)
    if result is not None:
        payload = {"scores": result.scores.detach().cpu(), "n_used": result.n_used.cpu(),
                   "n_skipped": result.n_skipped.cpu(), "n_images": int(result.n_images), "meta": dict(meta or {})}
        atomic_save_torch(payload, scores_path(path))
        if plot:
            plot_scores(result.scores, mask, plot_path(path))


def plot_scores(scores: Tensor, mask: Tensor, path: str) -> None:
    """PNG of the channel scores sorted in decreasing order, selected channels marked (one curve per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.io import atomic_write

    rows_s = scores.detach().float().cpu().reshape(-1, scores.shape[-1])
    rows_m = mask.detach().cpu().reshape(-1, mask.shape[-1])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (s, m) in enumerate(zip(rows_s, rows_m)):
        order = torch.argsort(s, descending=True, stable=True)
        xs = torch.arange(s.numel())
        line, = ax.plot(xs, s[order], lw=1, label=f"class {i}" if rows_s.shape[0] > 1 else "score")
        sel = m[order]
        ax.scatter(xs[sel], s[order][sel], s=6, color=line.get_color(), zorder=3)
    ax.set_xlabel("channel rank")
    ax.set_ylabel("attribution score")
    ax.set_title(f"AWT channel scores ({int(rows_m[0].sum())} of {rows_m.shape[1]} selected: dots)")
    if 1 < rows_s.shape[0] <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


# ================================================================================================ attribution
def _unwrap(model):
    return getattr(model, "module", model)


def check_exact_supported(model, cfg=None) -> None:
    """Refuse (UserError) configurations where the background-logit sum is not affine in the input of ``cls[0]``.

    The exact path relies on: ``cls[0]`` a plain ``nn.Conv2d`` 1x1 (stride 1, no padding/dilation/groups) with bias
    whose forward is the standard one and carries no hooks; the model's forward the standard
    ``IncrementalSegmentationModule.forward`` (classifiers on ``pre_logits``, bilinear upsampling, concatenation);
    no cosine classifier and a single background mode. A numerical check follows on the first input size."""
    hint = "use --attribution captum for this configuration"
    if cfg is not None:
        if getattr(cfg, "cosine", False):
            raise UserError(f"--attribution exact does not support --cosine (the classifier is not affine); {hint}")
        if int(getattr(cfg, "nb_background_modes", 1) or 1) > 1:
            raise UserError("--attribution exact does not support a multi-modal background "
                            f"(--nb_background_modes > 1 fuses several logits non-linearly); {hint}")
    model = _unwrap(model)
    cls = getattr(model, "cls", None)
    if not isinstance(cls, nn.ModuleList) or len(cls) == 0:
        raise UserError(f"--attribution exact needs a model with a ModuleList `cls` of classifiers; {hint}")
    c0 = cls[0]
    if type(c0) is not nn.Conv2d or "forward" in vars(c0) or type(c0).forward is not nn.Conv2d.forward:
        raise UserError(f"--attribution exact needs cls[0] to be a plain nn.Conv2d, got {type(c0).__name__}; {hint}")
    if (tuple(c0.kernel_size) != (1, 1) or tuple(c0.stride) != (1, 1) or tuple(c0.dilation) != (1, 1)
            or c0.groups != 1 or (isinstance(c0.padding, str) and c0.padding != "valid")
            or (not isinstance(c0.padding, str) and tuple(c0.padding) != (0, 0)) or c0.bias is None):
        raise UserError("--attribution exact needs cls[0] to be a 1x1 convolution with bias (stride 1, no padding, "
                        f"dilation or groups), got {c0}; {hint}")
    if c0._forward_hooks or c0._forward_pre_hooks:
        raise UserError(f"--attribution exact: cls[0] carries forward hooks that may change its output; {hint}")
    head_channels = getattr(model, "head_channels", c0.in_channels)
    if c0.in_channels != head_channels:
        raise UserError(f"--attribution exact: cls[0] reads {c0.in_channels} channels but the head produces "
                        f"{head_channels}; {hint}")
    try:
        from segmentation_module import IncrementalSegmentationModule
    except ImportError:  # pragma: no cover - the model module is part of the framework
        IncrementalSegmentationModule = None
    if IncrementalSegmentationModule is None or not isinstance(model, IncrementalSegmentationModule) \
            or type(model).forward is not IncrementalSegmentationModule.forward or "forward" in vars(model):
        raise UserError(f"--attribution exact needs the standard IncrementalSegmentationModule forward, got "
                        f"{type(model).__name__}; {hint}")


def upsample_column_sums(in_size: tuple[int, int], out_size: tuple[int, int], device=None,
                         dtype=torch.float32) -> Tensor:
    """Column sums ``a[i, j]`` of the bilinear (align_corners=False) upsampling operator from ``in_size`` to
    ``out_size``: the gradient of ``sum(interpolate(z))`` w.r.t. ``z`` (the adjoint applied to a ones map)."""
    z = torch.ones(1, 1, *in_size, device=device, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        F.interpolate(z, size=tuple(out_size), mode="bilinear", align_corners=False).sum().backward()
    return z.grad[0, 0].to(dtype)


class ExactAttributor:
    """Closed-form Integrated Gradients of ``sum_pixels(logits[:, 0])`` w.r.t. the input of ``cls[0]``.

    ``F(z) = sum_{c,i,j} W_bg[c] a_ij z[c,i,j] + const``, so ``IG(z; z') = (z - z') * W_bg[c] * a_ij`` exactly
    (docs/awt.md). One forward per image batch; the baseline ``z'`` (zero image) and ``a`` once per input size."""

    def __init__(self, model, cfg=None, *, verify: bool = True):
        check_exact_supported(model, cfg)
        self.model = _unwrap(model)
        self.verify = verify
        self._cache: dict = {}

    @torch.no_grad()
    def _baseline(self, shape, device, dtype):
        """``(z', a)`` for an input size: one forward of a batch of 3 zero images; images 1 and 2 get a
        perturbation of the classifier input (random, and aligned with the background weights so that no
        cancellation hides a non-linearity) to check numerically that F is affine there."""
        key = (tuple(shape), str(device), dtype)
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = self.model.cls[0].weight[0, :, 0, 0].detach()
            deltas = {}

            def perturb(_module, inp):
                z = inp[0]
                rand = torch.randn(z.shape[1:], generator=gen, dtype=torch.float64)
                aligned = rand.abs() * torch.sign(w.double().cpu())[:, None, None]
                deltas["d"] = torch.stack([torch.zeros_like(rand), rand, aligned]).to(z.device)
                return (z + deltas["d"].to(z.dtype),)

            zeros = torch.zeros(3 if self.verify else 1, 3, *shape, device=device, dtype=dtype)
            hook = self.model.cls[0].register_forward_pre_hook(perturb) if self.verify else None
            try:
                logits, extras = self.model(zeros)
            finally:
                if hook is not None:
                    hook.remove()
            z0 = extras["pre_logits"][:1]
            a = upsample_column_sums(z0.shape[-2:], logits.shape[-2:], device=device, dtype=z0.dtype)
            if self.verify:
                self._verify_affine(logits, deltas["d"], w, a)
            self._cache[key] = (z0, a)
        return self._cache[key]

    @staticmethod
    def _verify_affine(logits, deltas, w, a) -> None:
        grad = w.double()[:, None, None] * a.double()  # dF/dz if F is affine
        sums = logits[:, 0].double().sum(dim=(1, 2))
        for i in (1, 2):
            actual = float(sums[i] - sums[0])
            predicted = float((deltas[i] * grad).sum())
            scale = float((deltas[i].abs() * grad.abs()).sum()) + 1e-12
            if abs(actual - predicted) > 1e-3 * abs(predicted) + 1e-5 * scale:
                raise UserError("--attribution exact: the background logit sum is not affine in the input of "
                                f"cls[0] for this model (perturbation check {actual:.6g} vs {predicted:.6g}); "
                                "use --attribution captum")

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Per-image layer attributions ``(B, C, h, w)`` (same values as Captum's LayerIntegratedGradients)."""
        _, extras = self.model(images)
        z = extras["pre_logits"]
        z0, a = self._baseline(images.shape[-2:], images.device, images.dtype)
        w = self.model.cls[0].weight[0, :, 0, 0].to(z.dtype)
        return (z - z0) * w[None, :, None, None] * a[None, None]


class CaptumAttributor:
    """The reference computation: Captum ``LayerIntegratedGradients`` on ``cls[0]``'s input, target 0, zero image
    baseline, ``n_steps`` Gauss-Legendre points, one image at a time, parameters frozen."""

    def __init__(self, model, *, n_steps: int = 50, internal_batch_size: int | None = 8):
        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError as exc:  # pragma: no cover - captum is a requirement
            raise UserError("--attribution captum needs the captum package (pip install captum)") from exc
        self.model = _unwrap(model)
        self.n_steps = int(n_steps)
        self.internal_batch_size = internal_batch_size
        model_ref = self.model

        def summed_logits(x):
            return model_ref(x)[0].sum(dim=(2, 3))

        self.lig = LayerIntegratedGradients(summed_logits, self.model.cls[0])

    def __call__(self, images: Tensor) -> Tensor:
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        outs = []
        try:
            with torch.enable_grad():
                for i in range(images.shape[0]):
                    att = self.lig.attribute(images[i:i + 1], target=0, n_steps=self.n_steps,
                                             internal_batch_size=self.internal_batch_size,
                                             attribute_to_layer_input=True)
                    outs.append((att[0] if isinstance(att, (tuple, list)) else att).detach())
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return torch.cat(outs, 0)


def build_attributor(model, cfg=None, *, method: str = "exact", n_steps: int = 50, internal_batch_size: int = 8):
    if method == "exact":
        return ExactAttributor(model, cfg)
    if method == "captum":
        return CaptumAttributor(model, n_steps=n_steps, internal_batch_size=internal_batch_size)
    raise UserError(f"unknown --attribution {method!r}; choose exact or captum")


@dataclass
class AttributionResult:
    scores: Tensor  # [K, C] float32 (K = 1 for the union of the new classes, N_new per class)
    n_used: Tensor  # [K] images that entered each group's aggregate
    n_skipped: Tensor  # [K] images skipped because the group's downsampled mask was empty
    n_images: int  # images drawn from the dataset


class ScoreAccumulator:
    """Streaming aggregation of masked per-image attributions for K groups (union: K = 1; per class: K = N_new).

    Memory is O(K * C * h * w) whatever the number of images: the two "mean first" variants keep the running sum
    of masked maps, the two "per-image reduction first" variants keep running sums of per-image reductions."""

    def __init__(self, groups: int, aggregation: str = "max_after_mean"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self.k = int(groups)
        self.aggregation = aggregation
        self.sums: Tensor | None = None  # (K, C, h, w) or (K, C), float64
        self.used = torch.zeros(self.k, dtype=torch.long)
        self.skipped = torch.zeros(self.k, dtype=torch.long)

    def update(self, attributions: Tensor, masks: Tensor) -> None:
        """``attributions`` (B, C, h, w); ``masks`` (B, K, h, w) 0/1 at attribution resolution."""
        b, c, h, w = attributions.shape
        if masks.shape != (b, self.k, h, w):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match {(b, self.k, h, w)}")
        map_based = self.aggregation in ("max_after_mean", "avg_after_mean")
        if self.sums is None:
            shape = (self.k, c, h, w) if map_based else (self.k, c)
            self.sums = torch.zeros(shape, dtype=torch.float64, device=attributions.device)
        elif map_based and tuple(self.sums.shape[2:]) != (h, w):
            raise UserError(f"attribution maps change size ({tuple(self.sums.shape[2:])} then {(h, w)}): "
                            f"{self.aggregation} needs one crop size (check --crop_size)")
        valid = masks.flatten(2).amax(2) > 0  # (B, K)
        for k in range(self.k):
            sel = valid[:, k]
            n = int(sel.sum())
            self.used[k] += n
            self.skipped[k] += b - n
            if n == 0:
                continue
            masked = attributions[sel].double() * masks[sel, k, None].double()
            if map_based:
                self.sums[k] += masked.sum(0)
            elif self.aggregation == "mean_after_max":
                self.sums[k] += masked.amax(dim=(2, 3)).sum(0)
            else:  # mean_after_avg
                self.sums[k] += masked.mean(dim=(2, 3)).sum(0)

    def scores(self, *, accumulate_groups: bool = False) -> tuple[Tensor, Tensor]:
        """(scores [K, C] float32, images used [K]). ``accumulate_groups``: group k aggregates groups 0..k (the
        released attribute_class.py behaviour)."""
        if self.sums is None:
            raise UserError("no image was attributed")
        sums, used = self.sums, self.used.clone()
        if accumulate_groups:
            sums, used = sums.cumsum(0), used.cumsum(0)
        denom = used.clamp(min=1).to(sums.device, sums.dtype).reshape(-1, *([1] * (sums.dim() - 1)))
        mean = sums / denom
        if self.aggregation == "max_after_mean":
            mean = mean.amax(dim=(2, 3))
        elif self.aggregation == "avg_after_mean":
            mean = mean.mean(dim=(2, 3))
        return mean.float().cpu(), used


def attribution_masks(labels: Tensor, size: tuple[int, int], groups: list[list[int]] | None) -> Tensor:
    """(B, K, h, w) 0/1 masks: group k = pixels whose label is in ``groups[k]``, nearest-downsampled to ``size``;
    ``groups`` None = the whole image (no --mask_att)."""
    b = labels.shape[0]
    if groups is None:
        return torch.ones(b, 1, *size, device=labels.device)
    full = torch.stack([torch.isin(labels, torch.tensor(g, device=labels.device)) for g in groups], 1).float()
    return F.interpolate(full, size=tuple(size), mode="nearest")


def channel_importance(model_old, batches: Iterable, new_classes: Sequence[int], *, aggregation: str = "max_after_mean",
                       mask_att: bool = True, per_class: bool = False, accumulate_classes: bool = False,
                       method: str = "exact", n_steps: int = 50, internal_batch_size: int = 8, cfg=None,
                       device=None, log_every: int = 0) -> AttributionResult:
    """Signed channel scores of the old model's background logit for the step's new classes.

    ``batches`` yields ``(images (B,3,H,W), labels (B,H,W))`` with labels in the remapped index space;
    ``new_classes`` are the remapped ids of the step's new classes. Scores are ``[1, C]`` for the union of the new
    classes or ``[N_new, C]`` with ``per_class`` (without ``mask_att`` a per-class split is meaningless: refused).
    Images whose (downsampled) mask is empty are skipped and counted; if a group has no image left -> UserError."""
    if per_class and not mask_att:
        raise UserError("per-class channel masks need --mask_att (without it every class sees the whole image)")
    new_classes = [int(c) for c in new_classes]
    if not new_classes:
        raise UserError("the step has no new classes to attribute")
    attributor = build_attributor(model_old, cfg, method=method, n_steps=n_steps,
                                  internal_batch_size=internal_batch_size)
    groups = None if not mask_att else ([[c] for c in new_classes] if per_class else [new_classes])
    acc = ScoreAccumulator(len(groups) if groups else 1, aggregation)
    n_images, t0 = 0, time.time()
    for images, labels in batches:
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        attributions = attributor(images.float())
        acc.update(attributions, attribution_masks(labels, attributions.shape[-2:], groups))
        n_images += images.shape[0]
        if log_every and (n_images // images.shape[0]) % log_every == 0:
            log.info("AWT attribution: %d images (%.1f s)", n_images, time.time() - t0)
    if n_images == 0:
        raise UserError("no image to attribute: the step's training set is empty")
    scores, used = acc.scores(accumulate_groups=per_class and accumulate_classes)
    skipped = acc.skipped.cumsum(0) if per_class and accumulate_classes else acc.skipped.clone()
    empty = [new_classes[k] if per_class else "new" for k in range(acc.k) if int(used[k]) == 0]
    if empty:
        what = f"class(es) {empty}" if per_class else "the new classes"
        raise UserError(f"all {n_images} attributed images were skipped for {what}: their pixels cover no cell of "
                        f"the {tuple(attributions.shape[-2:])} attribution grid (nearest downsampling); use more "
                        "images (--att_max_images), a larger --crop_size, or the union mask (attribute.py)")
    return AttributionResult(scores=scores, n_used=used, n_skipped=skipped, n_images=n_images)


# ================================================================================================ pipeline
class _IsolatedRNG:
    """Seed torch/numpy/random for a reproducible pass and restore the callers' RNG states afterwards, so that
    computing a mask inside run.py does not change the training randomness that follows."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self):
        import random

        import numpy as np

        self._states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.manual_seed(self.seed)  # also seeds CUDA generators; they are unused by the (eval) attribution pass
        random.seed(self.seed)
        np.random.seed(self.seed)
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np

        torch.set_rng_state(self._states[0])
        random.setstate(self._states[1])
        np.random.set_state(self._states[2])
        return False


def _collate_list(items):
    return items


def attribution_batches(dataset, *, batch_size: int, max_images: int | None, seed: int) -> Iterable:
    """Batches ``(images, labels)`` of the first ``max_images`` items of a seeded permutation of ``dataset``.

    No worker processes (the random training transform draws from the main process's seeded RNG, so the mask does
    not depend on --num_workers); images of different sizes go to different batches."""
    from torch.utils.data import DataLoader, Subset

    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    if max_images is not None:
        order = order[:max_images]
    loader = DataLoader(Subset(dataset, order), batch_size=max(1, int(batch_size)), shuffle=False, num_workers=0,
                        collate_fn=_collate_list)
    for items in loader:
        by_size: dict = {}
        for image, label in items:
            by_size.setdefault(tuple(image.shape[-2:]), []).append((image, label))
        for group in by_size.values():
            yield torch.stack([g[0] for g in group]), torch.stack([torch.as_tensor(g[1]) for g in group])


def _n_new(cfg, step: int) -> int:
    from dataset.tasks import classes_per_step

    return int(classes_per_step(cfg.dataset, cfg.task, step)[-1])


def compute_mask(cfg, step: int, model_old, device, *, per_class: bool = False, dataset=None):
    """Attribute with the step's training set (training transform) seeded by ``--random_seed``.

    Returns ``(mask, result, meta)``: bool ``[C]`` (union) or ``[N_new, C]`` (per class), the scores and the
    metadata written next to the mask."""
    from dataset.tasks import new_class_indices

    validate_awt_args(cfg)
    if float(cfg.att) <= 0:
        raise UserError("AWT channel masks need --att in (0, 100], e.g. --att 25")
    if step < 1:
        raise UserError(f"AWT attribution needs an incremental step (--step >= 1), got step {step}")
    if dataset is None:
        from utils.builders import build_step_datasets

        dataset = build_step_datasets(cfg, step)[0]
    new_classes = new_class_indices(cfg.dataset, cfg.task, step)
    method = cfg.attribution
    ig_steps, max_images = resolved_ig_steps(cfg), resolved_max_images(cfg)
    aggregation = aggregation_name(cfg)
    kind = "per class" if per_class else "union"
    log.info("AWT step %d: %s attribution (%s%s) of the step-%d model, %s of new classes %s, aggregation %s, "
             "%s images", step, method, "closed form" if method == "exact" else f"Captum, {ig_steps} steps",
             "" if cfg.mask_att else ", whole images", step - 1, kind, new_classes, aggregation,
             "all" if max_images is None else f"at most {max_images}")
    t0 = time.time()
    model_old = _unwrap(model_old)
    was_training = model_old.training
    model_old.eval()
    try:
        with _IsolatedRNG(cfg.random_seed):
            batches = attribution_batches(dataset, batch_size=cfg.batch_size if method == "exact" else 1,
                                          max_images=max_images, seed=cfg.random_seed)
            result = channel_importance(model_old, batches, new_classes, aggregation=aggregation,
                                        mask_att=bool(cfg.mask_att), per_class=per_class,
                                        accumulate_classes=bool(cfg.att_accumulate_classes), method=method,
                                        n_steps=ig_steps, internal_batch_size=cfg.ig_batch_size, cfg=cfg,
                                        device=device, log_every=50)
    finally:
        model_old.train(was_training)
    scores = result.scores if per_class else result.scores[0]
    mask = select_top_channels(scores, cfg.att)
    seconds = time.time() - t0
    log.info("AWT step %d: %d images, used %s, skipped (empty mask) %s; selected %d of %d channels in %.1f s",
             step, result.n_images, result.n_used.tolist(), result.n_skipped.tolist(),
             int(mask.reshape(-1, mask.shape[-1])[0].sum()), mask.shape[-1], seconds)
    meta = {"step": int(step), "kind": "class" if per_class else "union", "att": float(cfg.att),
            "selected": num_selected_channels(cfg.att, mask.shape[-1]), "aggregation": aggregation,
            "attribution": method, "ig_steps": ig_steps if method == "captum" else None,
            "mask_att": bool(cfg.mask_att), "accumulate_classes": bool(per_class and cfg.att_accumulate_classes),
            "new_classes": list(new_classes), "max_images": max_images, "random_seed": int(cfg.random_seed),
            "crop_size": int(cfg.crop_size), "dataset": cfg.dataset, "task": cfg.task, "name": cfg.name,
            "old_classifier_sha1": classifier_fingerprint(model_old), "seconds": round(seconds, 3)}
    return mask, result, meta


def resolve_per_class(cfg, step: int, per_class: bool | None = None) -> bool:
    """Per-class masks when asked (``per_class`` / ``--att_per_class``); otherwise the union mask, except that a
    per-class file written by attribute_class.py is used when no union file exists."""
    if per_class is not None:
        return bool(per_class)
    if cfg.att_per_class:
        return True
    union, per = channels_path(cfg, step, per_class=False), channels_path(cfg, step, per_class=True)
    if not os.path.isfile(union) and os.path.isfile(per):
        log.info("AWT step %d: using the per-class channel mask %s (no union mask %s)", step, per, union)
        return True
    return False


def _compute_or_load_local(cfg, step, model_old, device, per_class, dataset=None):
    path = channels_path(cfg, step, per_class=per_class)
    channels = int(_unwrap(model_old).cls[0].in_channels)
    n_new = _n_new(cfg, step) if per_class else None
    if os.path.isfile(path):
        mask = load_mask(path, channels, n_new, model_old=model_old)
        log.info("AWT step %d: loaded channel mask %s (%d of %d channels)", step, path,
                 int(mask.reshape(-1, channels)[0].sum()), channels)
        return mask, path
    mask, result, meta = compute_mask(cfg, step, model_old, device, per_class=per_class, dataset=dataset)
    write_mask(path, mask, result, meta, plot=bool(cfg.att_plot))
    log.info("AWT step %d: wrote channel mask %s", step, path)
    return mask, path


def compute_or_load_mask(cfg, step: int, model_old, device, *, per_class: bool | None = None,
                         dataset=None) -> Tensor | None:
    """The AWT channel mask of ``step`` for run.py: loaded from :func:`channels_path` when the file exists
    (size validated), else computed with the step's training set and written. None when AWT is not requested
    (``--no_att`` or ``--att 0``). Under DDP rank 0 computes/writes, the others wait and load the same file."""
    validate_awt_args(cfg)
    if cfg.no_att or float(cfg.att) <= 0:
        return None
    from utils.dist import broadcast_object, is_distributed, is_main_process

    if not is_distributed():
        return _compute_or_load_local(cfg, step, model_old, device, resolve_per_class(cfg, step, per_class),
                                      dataset)[0]
    status, error, mask = None, None, None
    if is_main_process():
        try:
            pc = resolve_per_class(cfg, step, per_class)
            mask, path = _compute_or_load_local(cfg, step, model_old, device, pc, dataset)
            status = ("ok", path, pc)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            error = exc
            status = ("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__, None)
    status = broadcast_object(status)  # also the barrier: nobody reads before rank 0 has written
    if error is not None:
        raise error
    if status[0] != "ok":
        raise UserError(f"rank 0 could not produce the AWT channel mask: {status[1]}")
    if mask is not None:
        return mask
    path, pc = status[1], status[2]
    channels = int(_unwrap(model_old).cls[0].in_channels)
    return load_mask(path, channels, _n_new(cfg, step) if pc else None, model_old=model_old)


def prepare_new_classifier(cfg, step: int, model, model_old, device, *, dataset=None) -> dict | None:
    """Initialise the new classifier of ``model`` at ``step`` > 0 (after the previous weights are loaded) following
    :func:`classifier_init_plan`; returns the plan used (with the mask) or None when it stays random.

    AWT requested and no mask available -> UserError; never a silent fall-back to a random classifier."""
    if step < 1:
        return None
    plan = classifier_init_plan(cfg)
    if plan is None:
        log.info("step %d: new classifier keeps its random initialisation (%s)", step,
                 "--no_att" if cfg.no_att else "no --att, --orig_init or --init_balanced")
        return None
    net = _unwrap(model)
    source = plan["mask_source"]
    mask = None
    if source == "attribution":
        if model_old is None:
            raise UserError(f"AWT (--att {cfg.att:g}) at step {step} needs the previous-step model")
        mask = compute_or_load_mask(cfg, step, model_old, device)
        if mask is None:  # pragma: no cover - att > 0 always yields a mask or an error
            raise UserError(f"AWT (--att {cfg.att:g}) could not produce a channel mask for step {step}")
        if mask.dim() == 2 and mask.shape[0] == 1:
            mask = mask[0]
    elif source == "random":
        mask = random_channel_mask(cfg, int(net.cls[0].in_channels))
        if plan["copy"]:
            mask = mask.bool()  # --copy needs a boolean mask (the reference crashed here)
    net.init_new_classifier(channel_mask=mask, orig_init=plan["orig_init"], copy=plan["copy"],
                            copy_bias=plan["copy_bias"])
    log.info("step %d: new classifier initialised from the background classifier (%s, orig_init=%s, copy=%s, "
             "copy_bias=%s)", step, "no channel mask" if mask is None else
             f"{source} mask, {int((mask.reshape(-1, mask.shape[-1])[0] != 0).sum())} of {mask.shape[-1]} channels",
             plan["orig_init"], plan["copy"], plan["copy_bias"])
    return {**plan, "channel_mask": mask}


# ================================================================================================ command line
def attribute_main(argv=None, *, per_class: bool = False) -> int:
    """attribute.py / attribute_class.py: same flags as run.py; writes the channel mask of every ``--step`` > 0
    (always recomputed, overwriting an existing file). Exit 0 on success, 2 with ``error: ...`` on a UserError."""
    import sys

    from utils.config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cfg = parse_config(argv)
        from utils.logger import setup_logging

        setup_logging(cfg.debug)
        validate_awt_args(cfg)
        if cfg.no_att or cfg.random_channels:
            raise UserError("nothing to attribute with --no_att or --random_channels (run.py needs no mask then)")
        if float(cfg.att) <= 0:
            raise UserError("pass --att in (0, 100], e.g. --att 25: the percentage of channels to select")
        if per_class and not cfg.mask_att:
            raise UserError("attribute_class.py needs --mask_att (per-class masks come from each class's pixels)")
        from utils.builders import load_old_model, select_device

        device = select_device(cfg)
        steps = [int(s) for s in cfg.step]
        if any(s < 1 for s in steps):
            raise UserError(f"attribution is for incremental steps: --step must be >= 1, got {steps}")
        for i, step in enumerate(steps):
            model_old = load_old_model(cfg, step, device, first_step_of_call=(i == 0))
            mask, result, meta = compute_mask(cfg, step, model_old, device, per_class=per_class)
            path = channels_path(cfg, step, per_class=per_class)
            write_mask(path, mask, result, meta, plot=bool(cfg.att_plot))
            print(f"step {step}: wrote {path} ({meta['selected']} of {mask.shape[-1]} channels"
                  f"{f' x {mask.shape[0]} classes' if per_class else ''}; {result.n_images} images, skipped "
                  f"{result.n_skipped.tolist()})")
            del model_old
        return 0
    except UserError as exc:
        if debug:
            raise
        from utils.errors import one_line

        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
