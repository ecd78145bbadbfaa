"""AWT: Attribution-aware Weight Transfer (Goswami et al., WACV 2023). See docs/awt.md."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from dataset.incremental import build_step_datasets
from dataset.transform import images_to_device
from dataset.tasks import canonical_task, classes_per_step, new_class_indices
from methods.attribution import AGGREGATIONS, channel_importance, resolve_target, unwrap
from methods.base import INIT_BY_TRANSFER, Capabilities, Extension, StepContext, TransferSource
from methods.channel_masks import classifier_fingerprint, load_mask, write_mask
from methods.registry import register_extension
from methods.transfer import init_new_classifier
from modules.registry import HEADS
from utils.data import seeded_rng
from utils.dist import broadcast_object, is_distributed, is_main_process
from utils.errors import UserError
from utils.optim import forget_state_of_changed
from utils.flags import CLASS_INCREMENTAL, IGNORED, TRANSFER_INIT, mark

log = logging.getLogger(__name__)
WEAK_MASKS = ("whole", "localizer")
DEFAULT_WEAK_MASKS = "whole"
LOCALIZER_EMPTY = ("the localizer's masks name none of these pixels yet (every pixel below its confidence cut-offs or "
                   "claimed by two classes): start pseudo-supervision later (--pseudo_ep), or use --awt_weak whole; "
                   "the step continues from its last in-step checkpoint when rerun")


def add_awt_args(g: argparse._ActionsContainer) -> None:
    """Declare the AWT flags (reference names and defaults, plus this framework's own) in the group ``g``."""
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
    g.add_argument("--attribution", default="exact", choices=["exact", "captum", "similarity"],
                   help="exact: closed-form Integrated Gradients (the attributed function is affine in the "
                        "classifier input); captum: Captum LayerIntegratedGradients as in the reference; "
                        "similarity: NeST's sign-agreement x probability score, no gradient (docs/nest.md)")
    g.add_argument("--ig_steps", type=int, default=None,
                   help="Integrated-Gradients steps for --attribution captum (default: 30 on ADE, 50 elsewhere)")
    g.add_argument("--ig_batch_size", type=int, default=8,
                   help="Captum internal batch size (interpolation points per backbone pass)")
    g.add_argument("--att_max_images", type=int, default=None,
                   help="cap on the images attributed: stop after the first used image at position N-1 or later "
                        "(the reference's rule; default: 2001 on ADE, 5001 on ADE task 50/50-50, else all)")
    g.add_argument("--att_plot", action="store_true", default=False,
                   help="also write a PNG of the sorted channel scores with the selected channels marked")
    g.add_argument("--att_accumulate_classes", action="store_true", default=False,
                   help="per-class masks: accumulate attributions across classes like the released "
                        "attribute_class.py (class k uses classes 1..k); default resets per class")
    g.add_argument("--att_per_class", action="store_true", default=False,
                   help="run.py: use (and compute if missing) one channel mask per new class, as written by "
                        "attribute_class.py, instead of one mask for the union of the new classes")
    g.add_argument("--awt_weak", default=None, choices=WEAK_MASKS,
                   help="AWT at a weak step (--weakly), whose images have no new-class pixels: whole = attribute "
                        "whole images, with --mask_att per group the images whose image label holds its classes "
                        "(at the start of the step); localizer = the weak-step method's pseudo-masks of the new "
                        "classes (WILSON's localizer), so the initialisation waits for the start of epoch "
                        "--pseudo_ep, before which the new classifier receives no gradient (docs/awt.md); default: "
                        f"{DEFAULT_WEAK_MASKS}")
    mark(g, resume_free=("att_plot",),
         requires={"att": CLASS_INCREMENTAL, "random_channels": CLASS_INCREMENTAL,
                   "init_balanced": (CLASS_INCREMENTAL, TRANSFER_INIT), "orig_init": (CLASS_INCREMENTAL, TRANSFER_INIT)})


# ================================================================================================ flag resolution

# The reference's per-dataset choices, in one place: (ig_steps, max_images) per dataset, then per-task overrides.
# Caps: attribute.py breaks after an attributed image at loader position > 1999 (> 4999 for task 50), i.e. 2001 /
# 5001 positions (behaviour notes 11.5; the rule for skipped images is ScoreAccumulator's).
ATTRIBUTION_DEFAULTS = {
    "ade": {"ig_steps": 30, "max_images": 2001, "tasks": {"50": {"max_images": 5001}}},
    "voc": {"ig_steps": 50, "max_images": None},
    "cityscapes": {"ig_steps": 50, "max_images": None},
}
_FALLBACK_DEFAULTS = {"ig_steps": 50, "max_images": None}


def dataset_defaults(dataset: str, task: str) -> dict:
    """``{"ig_steps": int, "max_images": int | None}``: the reference's choices for this dataset and task."""
    entry = ATTRIBUTION_DEFAULTS.get(dataset, _FALLBACK_DEFAULTS)
    out = {"ig_steps": entry["ig_steps"], "max_images": entry["max_images"]}
    out.update(entry.get("tasks", {}).get(canonical_task(dataset, str(task)), {}))
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
    if cfg.awt_weak is not None and not getattr(cfg, "weakly", False):
        raise UserError(f"--awt_weak {cfg.awt_weak} chooses AWT's masks at weak steps, and this run has none (no "
                        "--weakly): drop it")
    if cfg.awt_weak is not None and (att <= 0 or cfg.random_channels or cfg.no_att):
        raise UserError(f"--awt_weak {cfg.awt_weak} chooses the masks of AWT's attribution, which this run does not "
                        "compute (it needs --att in (0, 100] without --random_channels / --no_att): drop it")


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


def classifier_init_plan(cfg, mib_init: bool = True) -> dict | None:
    """How the AWT extension initialises the new classifier at step > 0; None = it does not (the method's own
    initialisation or the random one stay). ``mib_init``: whether --init_balanced / --orig_init ask for MiB's
    initialisation (False when the method initialises the new classifier itself: ``Capabilities.classifier_init``).

    Returns ``{"mask_source": "attribution" | "random" | None, "orig_init", "copy", "copy_bias"}``; the last three
    are the keyword arguments of ``init_new_classifier`` and ``mask_source`` says where its ``channel_mask`` comes
    from (resolved by :func:`prepare_new_classifier`). Rules (docs/awt.md, "Initialisation variants"):
    ``--no_att`` -> None; ``--att > 0`` or ``--random_channels`` -> masked transfer (``--random_channels`` wins,
    ``--orig_init`` respected); else ``--orig_init`` or ``--init_balanced`` -> MiB init (with ``mib_init``); else
    None."""
    validate_awt_args(cfg)
    if cfg.no_att:
        return None
    if cfg.random_channels or float(cfg.att) > 0:
        return {"mask_source": "random" if cfg.random_channels else "attribution", "orig_init": bool(cfg.orig_init),
                "copy": bool(cfg.copy), "copy_bias": bool(cfg.copy_bias)}
    if mib_init and (cfg.orig_init or cfg.init_balanced):
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

    ``{channels_dir}/{task}-{dataset}_{name}/step{t}_{union|class}_att{att}_{aggregation}[_sim][_nomask][_cum]_{key}.pt``
    where ``_sim`` marks NeST's similarity scores (``--attribution similarity``), ``_nomask`` marks attributions over
    whole images (no ``--mask_att``), ``_weakwhole`` / ``_weaklocalizer`` a weak step's (``--awt_weak``), ``_cum`` per-class masks with
    ``--att_accumulate_classes`` and ``key`` is an 8-hex hash of the data settings (seed, crop, image cap, overlap,
    label masking, data root)."""
    kind = "class" if per_class else "union"
    parts = [f"step{int(step)}", kind, f"att{float(cfg.att):g}", aggregation_name(cfg)]
    if cfg.attribution == "similarity":  # other channels than the attribution's: another file
        parts.append("sim")
    weak = weak_mode(cfg, step)
    if weak == "localizer" or (weak and cfg.mask_att):  # other masks than the pixel labels': another file
        parts.append(f"weak{weak}")
    elif not cfg.mask_att:
        parts.append("nomask")
    if per_class and cfg.att_accumulate_classes:
        parts.append("cum")
    parts.append(_data_key(cfg))
    return os.path.join(str(cfg.channels_dir), f"{cfg.task}-{cfg.dataset}_{cfg.name}", "_".join(parts) + ".pt")


# ================================================================================================ pipeline
def _collate_list(items):
    return items


def weak_mode(cfg, step: int) -> str | None:
    """``--awt_weak`` at a weak step (``--weakly``, step >= 1), None at a step with pixel labels."""
    if not getattr(cfg, "weakly", False) or int(step) < 1:
        return None
    return str(cfg.awt_weak or DEFAULT_WEAK_MASKS)


def _targets(item) -> Tensor:
    """What an item gives the attribution masks: its label map, or at a weak step (its label all 255) its image
    labels (C - 1,), which :func:`attribution_masks` turns into whole-image masks."""
    if len(item) > 2 and isinstance(item[2], dict) and "img_labels" in item[2]:
        return torch.as_tensor(item[2]["img_labels"])
    return torch.as_tensor(item[1])


def attribution_batches(dataset, *, batch_size: int, seed: int) -> Iterable:
    """Batches ``(images, targets)`` of a seeded permutation of ``dataset``, loaded as they are consumed; targets are
    label maps (B, H, W), or image labels (B, C - 1) for the items of a weak step.

    No worker processes (the random training transform draws from the main process's seeded RNG, so the mask does
    not depend on --num_workers); images of different sizes go to different batches."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    loader = DataLoader(Subset(dataset, order), batch_size=max(1, int(batch_size)), shuffle=False, num_workers=0,
                        collate_fn=_collate_list)
    for items in loader:
        by_size: dict = {}
        for item in items:
            by_size.setdefault(tuple(item[0].shape[-2:]), []).append((item[0], _targets(item)))
        for group in by_size.values():
            yield torch.stack([g[0] for g in group]), torch.stack([g[1] for g in group])


def labelled_batches(batches: Iterable, labeler: Callable, device) -> Iterable:
    """``(images, img_labels)`` batches turned into ``(images, label maps)`` by a weak-step method's ``labeler``."""
    for images, img_labels in batches:
        if img_labels.dim() != 2:
            raise UserError("--awt_weak localizer needs the image labels of a weak step's items (--weakly)")
        images = images_to_device(images, device)
        yield images, labeler(images, img_labels.to(device))


def _n_new(cfg, step: int) -> int:
    return int(classes_per_step(cfg.dataset, cfg.task, step)[-1])


def compute_mask(cfg, step: int, model_old, device, *, per_class: bool = False, dataset=None,
                 source: TransferSource | None = None, labeler: Callable | None = None):
    """Attribute with the step's training set (training transform) seeded by ``--random_seed``; ``labeler``: the
    weak-step method's pixel labels from image labels (``--awt_weak localizer``), else the items' own targets.

    Returns ``(mask, result, meta)``: bool ``[C]`` (union) or ``[N_new, C]`` (per class), the scores and the
    metadata written next to the mask."""
    validate_awt_args(cfg)
    if float(cfg.att) <= 0:
        raise UserError("AWT channel masks need --att in (0, 100], e.g. --att 25")
    if step < 1:
        raise UserError(f"AWT attribution needs an incremental step (--step >= 1), got step {step}")
    if dataset is None:
        dataset = build_step_datasets(cfg, step)[0]
    new_classes = new_class_indices(cfg.dataset, cfg.task, step)
    method = cfg.attribution
    weak = weak_mode(cfg, step)
    if weak == "localizer" and labeler is None:
        raise UserError("--awt_weak localizer takes the masks of the weak-step method's localizer, which exists only "
                        "while run.py trains the step: let run.py compute the mask, or use --awt_weak whole")
    mask_att = bool(cfg.mask_att) or weak == "localizer"
    ig_steps, max_images = resolved_ig_steps(cfg), resolved_max_images(cfg)
    aggregation = aggregation_name(cfg)
    kind = "per class" if per_class else "union"
    log.info("AWT step %d: %s attribution (%s%s) of the step-%d model, %s of new classes %s, aggregation %s, "
             "%s images", step, method, {"exact": "closed form", "similarity": "no gradient"}.get(method, f"Captum, {ig_steps} steps"),
             {"whole": ", weak step: image labels", "localizer": ", weak step: the localizer's masks"}.get(
                 weak, "" if mask_att else ", whole images"), step - 1, kind, new_classes, aggregation,
             "all" if max_images is None else f"capped at position {max_images - 1}")
    t0 = time.time()
    model_old = unwrap(model_old)
    was_training = model_old.training
    model_old.eval()
    try:
        with seeded_rng(int(cfg.random_seed)):  # same mask in attribute.py and run.py; training RNG untouched
            batches = attribution_batches(dataset, batch_size=1 if method == "captum" else cfg.batch_size,
                                          seed=cfg.random_seed)
            if labeler is not None:
                batches = labelled_batches(batches, labeler, device)
            result = channel_importance(model_old, batches, new_classes, aggregation=aggregation,
                                        mask_att=mask_att, per_class=per_class,
                                        accumulate_classes=bool(cfg.att_accumulate_classes), method=method,
                                        n_steps=ig_steps, internal_batch_size=cfg.ig_batch_size, cfg=cfg,
                                        device=device, source=source, max_images=max_images,
                                        empty_advice=LOCALIZER_EMPTY if weak == "localizer" else None,
                                        total_images=len(dataset) if max_images is None else min(len(dataset),
                                                                                                  max_images))
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
            "mask_att": mask_att, "weak_masks": weak, "accumulate_classes": bool(per_class and cfg.att_accumulate_classes),
            "new_classes": list(new_classes), "max_images": max_images, "random_seed": int(cfg.random_seed),
            "crop_size": int(cfg.crop_size), "dataset": cfg.dataset, "task": cfg.task, "name": cfg.name,
            "old_classifier_sha1": classifier_fingerprint(model_old, source), "seconds": round(seconds, 3)}
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


def _channels(model, source: TransferSource | None) -> int:
    return int(resolve_target(model, source).layer.in_channels)


def _compute_or_load_local(cfg, step, model_old, device, per_class, dataset=None, source=None, labeler=None):
    path = channels_path(cfg, step, per_class=per_class)
    channels = _channels(model_old, source)
    n_new = _n_new(cfg, step) if per_class else None
    if os.path.isfile(path) and labeler is None:  # the localizer's masks depend on the training so far: recomputed
        mask = load_mask(path, channels, n_new, model_old=model_old, source=source)
        log.info("AWT step %d: loaded channel mask %s (%d of %d channels)", step, path,
                 int(mask.reshape(-1, channels)[0].sum()), channels)
        return mask, path
    mask, result, meta = compute_mask(cfg, step, model_old, device, per_class=per_class, dataset=dataset,
                                      source=source, labeler=labeler)
    write_mask(path, mask, result, meta, plot=bool(cfg.att_plot))
    log.info("AWT step %d: wrote channel mask %s", step, path)
    return mask, path


def compute_or_load_mask(cfg, step: int, model_old, device, *, per_class: bool | None = None,
                         dataset=None, source: TransferSource | None = None,
                         labeler: Callable | None = None) -> Tensor | None:
    """The AWT channel mask of ``step`` for run.py: loaded from :func:`channels_path` when the file exists
    (size validated), else computed with the step's training set and written; always computed with a ``labeler``
    (:func:`compute_mask`). None when AWT is not requested
    (``--no_att`` or ``--att 0``). Under DDP rank 0 computes/writes, the others wait and load the same file."""
    validate_awt_args(cfg)
    if cfg.no_att or float(cfg.att) <= 0:
        return None
    if not is_distributed():
        return _compute_or_load_local(cfg, step, model_old, device, resolve_per_class(cfg, step, per_class),
                                      dataset, source, labeler)[0]
    status, error, mask = None, None, None
    if is_main_process():
        try:
            pc = resolve_per_class(cfg, step, per_class)
            mask, path = _compute_or_load_local(cfg, step, model_old, device, pc, dataset, source, labeler)
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
    return load_mask(path, _channels(model_old, source), _n_new(cfg, step) if pc else None, model_old=model_old,
                     source=source)


def prepare_new_classifier(cfg, step: int, model, model_old, device, *, dataset=None,
                           transfer_source: Callable | None = None, plan: dict | None = None,
                           labeler: Callable | None = None) -> dict | None:
    """Initialise the new classifier of ``model`` at ``step`` > 0 (after the previous weights are loaded) following
    ``plan`` (default: :func:`classifier_init_plan` of ``cfg``); returns the plan used (with the mask) or None when
    it stays random. ``labeler``: a weak-step method's pixel labels for the attribution masks (``--awt_weak
    localizer``).

    ``transfer_source(model) -> TransferSource`` names the classifier row to transfer from and to attribute (the
    method's ``Method.transfer_source``); None: the background row of ``cls[0]``.
    AWT requested and no mask available -> UserError; never a silent fall-back to a random classifier."""
    if step < 1:
        return None
    plan = plan if plan is not None else classifier_init_plan(cfg)
    if plan is None:
        log.info("step %d: new classifier keeps its random initialisation (%s)", step,
                 "--no_att" if cfg.no_att else "no --att, --orig_init or --init_balanced")
        return None
    net = unwrap(model)
    new_source = transfer_source(net) if transfer_source else None
    source = plan["mask_source"]
    mask = None
    if source == "attribution":
        if model_old is None:
            raise UserError(f"AWT (--att {cfg.att:g}) at step {step} needs the previous-step model")
        old_source = transfer_source(unwrap(model_old)) if transfer_source else None
        mask = compute_or_load_mask(cfg, step, model_old, device, dataset=dataset, source=old_source,
                                    labeler=labeler)
        if mask is None:  # pragma: no cover - att > 0 always yields a mask or an error
            raise UserError(f"AWT (--att {cfg.att:g}) could not produce a channel mask for step {step}")
        if mask.dim() == 2 and mask.shape[0] == 1:
            mask = mask[0]
    elif source == "random":
        mask = random_channel_mask(cfg, _channels(net, new_source))
        if plan["copy"]:
            mask = mask.bool()  # --copy needs a boolean mask (the reference crashed here)
    init_new_classifier(net, channel_mask=mask, orig_init=plan["orig_init"], copy=plan["copy"],
                        copy_bias=plan["copy_bias"], source=(new_source.layer, new_source.row) if new_source else None)
    target = resolve_target(net, new_source)
    origin = "the background classifier" if (target.name, target.row) == ("cls[0]", 0) else \
        f"row {target.row} of {target.name}"
    log.info("step %d: new classifier initialised from %s (%s, orig_init=%s, copy=%s, "
             "copy_bias=%s)", step, origin, "no channel mask" if mask is None else
             f"{source} mask, {int((mask.reshape(-1, mask.shape[-1])[0] != 0).sum())} of {mask.shape[-1]} channels",
             plan["orig_init"], plan["copy"], plan["copy_bias"])
    return {**plan, "channel_mask": mask}


@register_extension
class AWT(Extension):
    """Initialises the new classifier at every step > 0 from the method's transfer source (by default the background
    classifier): on the channels AWT attributes (``--att``), on random channels (``--random_channels``) or everywhere
    (MiB's ``--init_balanced`` / ``--orig_init``, for methods that do not initialise it themselves); see
    :func:`classifier_init_plan`. At a weak step (``--weakly``) the attribution masks come from the image labels or
    the weak-step method's pseudo-masks (``--awt_weak``); with the latter the initialisation waits for them."""

    capabilities = Capabilities(weak_steps=True)
    name = "AWT"
    switches = ("att", "init_balanced", "orig_init", "random_channels", "no_att")
    transfer_hint = "--att 25 --mask_att, or --random_channels"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.deferred: tuple | None = None  # (ctx, labeler, plan, transfer source) until the labeler is ready

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        add_awt_args(group)

    @classmethod
    def check(cls, cfg) -> None:
        validate_awt_args(cfg)
        head = getattr(cfg, "head", None)
        if head and head in HEADS and getattr(HEADS[head], "classifies", "pixels") != "pixels" and (
                float(cfg.att) > 0 or cfg.random_channels):
            raise UserError(f"AWT transfers the background classifier on channels of the per-pixel features it "
                            f"attributes, and the {head} head's classifiers read "
                            f"{HEADS[head].classifies}: drop --att / --random_channels, or use a per-pixel head")

    @classmethod
    def transfer_plan(cls, cfg, method) -> dict | None:
        return classifier_init_plan(cfg, mib_init=method.capabilities.classifier_init == INIT_BY_TRANSFER)

    @classmethod
    def enabled(cls, cfg, method) -> bool:
        return cls.transfer_plan(cfg, method) is not None

    @classmethod
    def label(cls, cfg, method) -> str | None:
        plan = cls.transfer_plan(cfg, method)
        if plan is None or plan["mask_source"] is None:  # MiB's own initialisation
            return None
        return "AWT" if plan["mask_source"] == "attribution" else "RandomChannels"

    def init_new_classifier(self, ctx: StepContext) -> bool:
        stack = ctx.method
        plan = stack.init_plan.transfer if stack is not None else classifier_init_plan(self.cfg)
        transfer = stack.transfer_source if stack is not None else None
        if weak_mode(self.cfg, ctx.step) == "localizer" and plan is not None and plan["mask_source"] == "attribution":
            self.deferred = (ctx, self._labeler(ctx), plan, transfer)
            log.info("step %d: AWT initialises the new classifier at the start of epoch %d, from the localizer's "
                     "masks (--awt_weak localizer); it receives no gradient before", ctx.step,
                     self.deferred[1].ready_epoch + 1)
            return True
        return prepare_new_classifier(self.cfg, ctx.step, ctx.model, ctx.model_old, ctx.device,
                                      dataset=ctx.train_dataset, transfer_source=transfer, plan=plan) is not None

    def _labeler(self, ctx: StepContext):
        labeler = ctx.method.weak_labeler(ctx) if ctx.method is not None else None
        if labeler is None:
            name = ctx.method.method.name if ctx.method is not None else "this method"
            raise UserError(f"--awt_weak localizer takes the new classes' masks from the weak-step method, and "
                            f"{name} makes none: use --awt_weak whole")
        if labeler.ready_epoch >= self.cfg.epochs:
            raise UserError(f"--awt_weak localizer initialises the new classifier when the localizer's masks are "
                            f"ready, at epoch {labeler.ready_epoch + 1} (--pseudo_ep {labeler.ready_epoch}), which a "
                            f"{self.cfg.epochs}-epoch step never reaches: lower --pseudo_ep or use --awt_weak whole")
        return labeler

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        if self.deferred is None or epoch != self.deferred[1].ready_epoch:
            return
        ctx, labeler, plan, transfer = self.deferred
        params = [p for c in unwrap(ctx.model).cls for p in c.parameters()]
        before = {p: p.detach().clone() for p in params}
        prepare_new_classifier(self.cfg, ctx.step, ctx.model, ctx.model_old, ctx.device, dataset=ctx.train_dataset,
                               transfer_source=transfer, plan=plan, labeler=labeler.labels)
        reset = forget_state_of_changed(ctx.optimizer, before)
        log.info("step %d: optimiser state of the %d re-initialised classifier weights reset", ctx.step, reset)

    def after_step(self, ctx: StepContext) -> None:
        self.deferred = None
