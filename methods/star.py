"""STAR and STAR-M (Chen et al., "Saving 100x Storage: Prototype Replay for Reconstructing Training Sample
Distribution in Class-Incremental Semantic Segmentation", NeurIPS 2023), from the facts of its official code
(jinpeng0528/STAR 9e31f36, built on DKD's) collected in docs/star.md.

STAR is DKD's model, sigmoid outputs, freezing and inference (``methods/dkd.py``) with other losses and memory:

* after every step (``after_step``): per class of the step, a unit prototype, the mean and std of the feature norm,
  the per-channel noise around the prototype and the pixel counts, measured on the stride grid of the training data
  with the final model, written next to the step checkpoint (``*.prototypes.pth``; no image is stored);
* at steps > 0 (``STARLoss``): mBCE on the new classes with two extra negative sources, old-class features replayed
  from the prototypes (how many per iteration: the old-class pixels the current data lack against the previous
  step's counts) and a re-weighted repetition of the background pixels; OCFM, the feature distillation in the region
  the old model labels as an old class; SAD, pushing each new-class centre away from its nearest old prototype;
* the new classifier keeps its random initialisation and trains at 100 x lr; weight decay on every group.

The auxiliary classifier of DKD's layout stays (trained on detached features, so nothing else changes): it keeps
the label id = channel index layout and is AWT's transfer source (docs/star.md, "Composing with AWT").
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.transform import images_to_device, labels_to_device
from methods.base import INIT_OWN, Batch, LossTerm, StepContext
from methods.dkd import DKD, DeviceIds, aux_logits, on_grid, step_class_ids
from methods.registry import register_method
from modules.heads import final_layer
from utils.checkpoint import safe_load, step_ckpt_path
from utils.data import build_loader, seeded_rng
from utils.dist import all_reduce_sum, barrier, get_world_size, is_main_process
from utils.errors import UserError
from utils.flags import nonnegative_float
from utils.io import atomic_save_torch
from utils.loss import masked_feature_mse, multilabel_bce_per_class, never_loss, prototype_separation
from utils.progress import track

log = logging.getLogger(__name__)

BG_SHARE_PER_CLASS = 0.01  # overlap: each new class took 1 % of the old background (hard-coded upstream)
OLD_BG_SHARE = 0.5  # overlap: half of the current background is old background (hard-coded upstream)
RECORD_KEYS = ("classes", "numbers", "prototypes", "norm_mean_and_std", "noise")


def prototype_record_path(checkpoint: str, task: str, dataset: str, name: str, step: int) -> str:
    return step_ckpt_path(checkpoint, task, dataset, name, step)[: -len(".pth")] + ".prototypes.pth"


def old_prediction(logits_old: Tensor, rule: str) -> Tensor:
    """The old model's label per pixel: 1 + argmax over its classes (channel 0, the auxiliary one, left out), 0
    where the best class does not pass: ``rule="logit"`` its raw logit > 0.5 (the reference in training),
    ``"sigmoid"`` its sigmoid > 0.5 (the inference rule)."""
    best, cls = logits_old[:, 1:].float().max(dim=1)
    passes = best > (0.5 if rule == "logit" else 0.0)
    return torch.where(passes, cls + 1, torch.zeros_like(cls))


# ------------------------------------------------------------------------------------------------ statistics
class ClassStatistics:
    """Sums over the grid positions of each class, enough for prototype, norm statistics and noise in one pass."""

    def __init__(self, n_classes: int, channels: int, device):
        kw = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(n_classes, **kw)
        self.unit_sum = torch.zeros(n_classes, channels, **kw)
        self.unit_sq = torch.zeros(n_classes, channels, **kw)
        self.norm_sum = torch.zeros(n_classes, **kw)
        self.norm_sq = torch.zeros(n_classes, **kw)

    def add(self, features: Tensor, index: Tensor) -> None:
        """``features`` (P, D) at P positions of classes ``index`` (P,) (0-based rows)."""
        f = features.double()
        norms = f.norm(dim=1)
        unit = F.normalize(f, dim=1)
        self.count.index_add_(0, index, torch.ones_like(norms))
        self.unit_sum.index_add_(0, index, unit)
        self.unit_sq.index_add_(0, index, unit * unit)
        self.norm_sum.index_add_(0, index, norms)
        self.norm_sq.index_add_(0, index, norms * norms)

    def reduce(self) -> None:
        for t in (self.count, self.unit_sum, self.unit_sq, self.norm_sum, self.norm_sq):
            all_reduce_sum(t)

    def prototypes(self) -> Tensor:
        return F.normalize(self.unit_sum, dim=1)

    def norm_mean_and_std(self) -> Tensor:
        n = self.count.clamp(min=1)
        mean = self.norm_sum / n
        var = (self.norm_sq - n * mean * mean) / (self.count - 1).clamp(min=1)  # unbiased, as torch.std
        return torch.stack([mean, var.clamp(min=0).sqrt()])

    def noise(self, centres: Tensor) -> Tensor:
        """Per-channel RMS of ``unit feature - centre`` over each class's positions (``centres`` (C, D))."""
        n = self.count.clamp(min=1)[:, None]
        mean_sq = self.unit_sq / n - 2 * centres * self.unit_sum / n + centres * centres
        return mean_sq.clamp(min=0).sqrt()


@dataclass
class Replay:
    """What one iteration replays: ``index`` (sum K_j,) the old-class row of each fake feature, and ``rho``."""

    index: Tensor
    rho: float
    counts: dict


def replay_counts(numbers: list[float], q0: float, q: list[float], iterations: int, overlap: bool,
                  n_new_classes: int) -> tuple[list[int], float, list[float]]:
    """STAR's bookkeeping at the start of step t (docs/star.md section 4): from the previous counts ``numbers``
    ``[n_bg, n_1 .. n_C]`` and the old model's counts on the current data ``q0`` (background it also calls
    background) and ``q`` (background it calls old class j): the fake features per iteration ``K_j``, the background
    weight ``rho`` and the old part of the counts saved for step t+1 ``[bg, n_1 .. n_C]``."""
    n_bg, n_old = float(numbers[0]), [float(n) for n in numbers[1:]]
    if overlap:
        bg = n_bg * (1 - BG_SHARE_PER_CLASS * n_new_classes)
        k = [max(int((n - qj) // iterations), 0) for n, qj in zip(n_old, q)]
        rho = max(bg / q0 - OLD_BG_SHARE, 0.0) if q0 > 0 else 0.0
        saved = [OLD_BG_SHARE * q0 + bg, *n_old]
    else:
        bg = n_bg
        k = [max(int(n // iterations), 0) for n in n_old]
        rho = max(bg / q0, 0.0) if q0 > 0 else 0.0
        saved = [q0 + bg, *[n + qj for n, qj in zip(n_old, q)]]
    return k, rho, saved


def replay_features(record: dict, index: Tensor, per: str) -> Tensor:
    """Fake features of the old classes ``index`` (K,): ``(p_j + eps * s_j) * r`` with ``eps ~ N(0, I)`` and the
    norm ``r ~ N(mu_j, sigma_j^2)`` drawn per channel (``per="channel"``, the reference) or once per vector."""
    p, s = record["prototypes"][index], record["noise"][index]
    mu, sd = record["norm_mean_and_std"][0][index, None], record["norm_mean_and_std"][1][index, None]
    eps = torch.randn_like(p)
    r = mu + sd * torch.randn(p.shape[0], p.shape[1] if per == "channel" else 1, device=p.device, dtype=p.dtype)
    return (p + eps * s) * r


def star_mbce(ori: Tensor, fake: Tensor | None, w_fake: Tensor | float, bg: Tensor, w_bg: Tensor) -> Tensor:
    """``sum_c (L_ori,c + w_fake L_fake,c + w_bg L_bg,c) / (1 + w_fake + w_bg)``; per-class vectors (C_new,)."""
    total = ori + w_bg * bg
    if fake is not None:
        total = total + w_fake * fake
    return total.sum() / (1 + w_fake + w_bg)


# ------------------------------------------------------------------------------------------------ the loss
class STARLoss(LossTerm):
    """STAR's losses at one step: ``loss_mbce`` (with replay and background repetition at steps > 0), ``loss_ac``
    (the auxiliary classifier), ``loss_ocfm`` and ``loss_sad`` (steps > 0)."""

    name = "star"

    def __init__(self, *, method: "STAR", model: nn.Module, step: int, n_old: int, class_ids: list[int],
                 pos_weight: float, record: dict | None):
        self.method, self.model, self.step, self.n_old, self.class_ids = method, model, step, n_old, class_ids
        self.ids = DeviceIds(class_ids)
        self.pos_weight, self.record = float(pos_weight), record
        self.needs_old_model = step > 0
        self.replay: Replay | None = None
        self.weights = {"mbce": method.dkd.mbce, "ac": method.dkd.ac, "ocfm": method.options.pkd,
                        "sad": method.options.cont}

    def before_step(self, ctx: StepContext) -> None:
        if self.step > 0:
            self.replay = self.method.replay_plan(ctx, self.record)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        w, out = self.weights, {}
        o = self.method.options
        first, n_new = self.class_ids[0], len(self.class_ids)
        features = batch.extras["pre_logits"]
        ori = multilabel_bce_per_class(batch.logits[:, first:first + n_new], batch.labels, self.ids.on(features.device),
                                       self.pos_weight, self.method.dkd.mbce_ignore == "negative")
        if w["ac"]:
            out["loss_ac"] = w["ac"] * never_loss(aux_logits(self.model, features, batch.logits.shape[-2:]))
        if batch.logits_old is None:
            if w["mbce"]:
                out["loss_mbce"] = w["mbce"] * ori.sum()
            return out
        size = features.shape[-2:]
        old_pred = old_prediction(batch.logits_old, o.star_pseudo)
        head = final_layer(self.model.cls[-1])
        weight, bias = head.weight.flatten(1), head.bias
        if w["mbce"]:
            positions = features.shape[0] * size[0] * size[1]
            background = ((on_grid(batch.labels, size) == 0) & (on_grid(old_pred, size) == 0)).unsqueeze(1)
            z_bg = F.conv2d(features, weight[:, :, None, None].to(features.dtype), bias.to(features.dtype))
            n_bg = background.sum()
            bg = (F.softplus(z_bg.float()) * background).sum(dim=(0, 2, 3)) / n_bg.clamp(min=1)
            w_bg = self.replay.rho * n_bg / positions
            fake, w_fake = None, 0.0
            if self.replay.index.numel():
                x = replay_features(self.record, self.replay.index, o.star_norm_scale)
                fake = F.softplus((x @ weight.float().t() + bias.float())).mean(dim=0)
                w_fake = self.replay.index.numel() / positions
            out["loss_mbce"] = w["mbce"] * star_mbce(ori, fake, w_fake, bg, w_bg)
        if w["ocfm"]:
            region = ((batch.labels == 0) & (old_pred > 0)).float().unsqueeze(1)
            region = F.interpolate(region, size=size, mode="bilinear", align_corners=False)
            out["loss_ocfm"] = w["ocfm"] * masked_feature_mse(features, batch.extras_old["pre_logits"], region)
        if w["sad"]:
            masks = (batch.labels.unsqueeze(1) == self.ids.on(features.device).view(1, -1, 1, 1)).float()
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            out["loss_sad"] = w["sad"] * prototype_separation(features, masks, self.record["prototypes"])
        return out


# ------------------------------------------------------------------------------------------------ the method
@register_method
class STAR(DKD):
    """STAR: DKD's model and inference, prototype replay, OCFM and SAD, random new classifiers at 100 x lr."""

    name = "STAR"
    description = "STAR (NeurIPS 2023): prototype replay instead of images, OCFM and SAD on DKD's model"
    capabilities = dataclasses.replace(DKD.capabilities, classifier_init=INIT_OWN)  # its own init: random
    pos_weights = {"ade": (30.0, 30.0)}
    pos_weight_default = (4.0, 4.0)
    decay_only_new = False
    new_head_lr = 100.0
    dkd_only = {"kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "dkd_split": "weight", "dkd_awt_variant": "replace"}

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--pkd", type=nonnegative_float, default=5.0,
                           help="STAR: weight of OCFM, the feature distillation where the old model sees an old class "
                                "(default 5)")
        group.add_argument("--cont", type=nonnegative_float, default=0.05,
                           help="STAR: weight of SAD, 1 / distance of each new-class centre to its nearest old "
                                "prototype (default 0.05)")
        group.add_argument("--star_noise_prototype", default="reference", choices=["reference", "own"],
                           help="STAR: the prototype the noise of a class learnt at a step > 0 is measured around: "
                                "reference = the one the upstream index picks (another class's, which the published "
                                "numbers used), own = the class's own")
        group.add_argument("--star_pseudo", default="logit", choices=["logit", "sigmoid"],
                           help="STAR: old-model pseudo-labels in training: logit = raw logit > 0.5 (the reference), "
                                "sigmoid = sigmoid > 0.5 (the inference rule)")
        group.add_argument("--star_norm_scale", default="channel", choices=["channel", "vector"],
                           help="STAR: replayed feature norms drawn per channel (the reference) or one per vector")

    @classmethod
    def check(cls, cfg: Any) -> None:
        for dest, default in cls.dkd_only.items():
            if getattr(cfg, dest, default) != default:
                raise UserError(f"--{dest} is DKD's; --method {cfg.method} does not use it (remove it)")

    # ---- model -------------------------------------------------------------------------------------------------
    def init_new_classifier(self, ctx: StepContext) -> bool:
        log.info("step %d: the new classifier keeps its random initialisation (STAR)", ctx.step)
        return False

    # ---- losses ------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list[LossTerm]:
        record = self.read_record(ctx.step - 1, ctx.device) if ctx.step > 0 else None
        self._term = STARLoss(method=self, model=ctx.model, step=ctx.step, n_old=ctx.n_old,
                              class_ids=step_class_ids(ctx), pos_weight=self.pos_weight(ctx.step), record=record)
        return [self._term]

    # ---- prototype memory --------------------------------------------------------------------------------------
    def record_path(self, step: int) -> str:
        c = self.cfg
        path = prototype_record_path(c.checkpoint, c.task, c.dataset, c.name, step)
        if not os.path.isfile(path) and c.step_ckpt:  # the previous step given with --step_ckpt: its file beside it
            beside = c.step_ckpt[: -len(".pth")] + ".prototypes.pth" if c.step_ckpt.endswith(".pth") else ""
            if beside and os.path.isfile(beside):
                return beside
        return path

    def read_record(self, step: int, device) -> dict:
        path = self.record_path(step)
        if not os.path.isfile(path):
            raise UserError(f"{self.name} needs the prototypes of step {step} ({path}), written when that step "
                            f"finished; retrain step {step} (--overwrite) or put the file beside --step_ckpt")
        raw = safe_load(path, "prototype record")
        if not isinstance(raw, dict) or any(k not in raw for k in RECORD_KEYS):
            raise UserError(f"{path} is not a {self.name} prototype record (keys {', '.join(RECORD_KEYS)}); delete "
                            f"it and retrain step {step}")
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in raw.items()}

    def iterate_grid(self, ctx: StepContext, model: nn.Module, what: str):
        """``(features (B, D, h, w), labels on the grid (B, h, w), logits (B, C, H, W), labels)`` of one pass of
        ``model`` (eval mode, no grad) over the step's training data with its augmentation, under its own seed."""
        loader = ctx.train_loader
        if hasattr(loader, "dataset"):  # a fresh pass with its own order, whatever epoch the step's loader is at
            dataset = getattr(loader.dataset, "dataset", loader.dataset)  # without the loader's seeded wrapper
            loader = build_loader(dataset, batch_size=self.cfg.batch_size, train=True, num_workers=0,
                                  seed=int(self.cfg.random_seed) + 7919 * ctx.step)
        was_training = model.training
        model.eval()
        try:
            with seeded_rng(int(self.cfg.random_seed) * 1013 + ctx.step), torch.no_grad():
                for item in track(loader, f"{self.name} step {ctx.step}: {what}"):
                    images, labels = item[0], item[1]
                    images = images_to_device(images, ctx.device)
                    labels = labels_to_device(labels, ctx.device)
                    with ctx.autocast():
                        logits, extras = model(images)
                    features = extras["pre_logits"].float()
                    yield features, on_grid(labels, features.shape[-2:]), logits, labels
        finally:
            model.train(was_training)

    def replay_plan(self, ctx: StepContext, record: dict) -> Replay:
        """The old model's counts on the current data, then K_j and rho (``replay_counts``)."""
        n_old_fg = ctx.n_old - 1
        q = torch.zeros(n_old_fg + 1, dtype=torch.float64, device=ctx.device)
        for features, grid, logits, _labels in self.iterate_grid(ctx, ctx.model_old, "old-class counts"):
            pred = on_grid(old_prediction(logits, self.options.star_pseudo), features.shape[-2:])
            background = grid == 0
            q += torch.bincount(pred[background].flatten(), minlength=n_old_fg + 1)[: n_old_fg + 1].double()
        all_reduce_sum(q)
        iterations = len(ctx.train_loader) * get_world_size()
        numbers = record["numbers"].tolist()
        k, rho, saved = replay_counts(numbers, float(q[0]), q[1:].tolist(), iterations, bool(self.cfg.overlap),
                                      ctx.n_new)
        index = torch.repeat_interleave(torch.arange(n_old_fg, device=ctx.device),
                                        torch.as_tensor(k, device=ctx.device))
        log.info("%s step %d: %d replayed old-class features per iteration, background weight %.3g", self.name,
                 ctx.step, index.numel(), rho)
        return Replay(index=index, rho=rho, counts={"old": saved})

    def after_step(self, ctx: StepContext) -> None:
        """Measure and write the prototype record of this step's classes (every rank measures its shard; the sums
        are added over ranks, rank 0 writes)."""
        model = ctx.model
        ids = step_class_ids(ctx)
        stats = ClassStatistics(len(ids), model.head_channels, ctx.device)
        counts = torch.zeros(len(ids) + 1, dtype=torch.float64, device=ctx.device)
        first = ids[0]
        for features, grid, _logits, _labels in self.iterate_grid(ctx, model, "prototypes"):
            row = grid - first
            mine = (grid >= first) & (row < len(ids)) & (grid != 255)
            flat = features.permute(0, 2, 3, 1)[mine]
            stats.add(flat, row[mine])
            counts[0] += (grid == 0).sum()
        stats.reduce()
        all_reduce_sum(counts)
        counts[1:] = stats.count
        empty = [ids[i] for i in range(len(ids)) if stats.count[i] == 0]
        if empty:
            log.warning("%s step %d: classes %s have no pixel on the feature grid of the training data: their "
                        "prototypes are zero and they are never replayed", self.name, ctx.step, empty)
        record = self.read_record(ctx.step - 1, ctx.device) if ctx.step > 0 else None
        prototypes = stats.prototypes()
        if record is not None:
            all_protos = torch.cat([record["prototypes"].double(), prototypes])
            saved_old = self.replay_saved_counts(ctx)
            numbers = torch.cat([torch.as_tensor(saved_old, dtype=torch.float64, device=ctx.device), counts[1:]])
        else:
            all_protos, numbers = prototypes, counts
        if ctx.step > 0 and self.options.star_noise_prototype == "reference":
            centres = all_protos[: len(ids)]  # upstream indexes the concatenated array from the old classes' start
        else:
            centres = prototypes
        new = {"classes": ids, "prototypes": prototypes.float(), "norm_mean_and_std": stats.norm_mean_and_std().float(),
               "noise": stats.noise(centres).float()}
        if record is not None:
            new = {"classes": list(record["classes"]) + ids,
                   **{k: torch.cat([record[k].float(), new[k]], dim=1 if k == "norm_mean_and_std" else 0)
                      for k in ("prototypes", "norm_mean_and_std", "noise")}}
        new["numbers"] = numbers.cpu()
        new = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in new.items()}
        path = prototype_record_path(self.cfg.checkpoint, self.cfg.task, self.cfg.dataset, self.cfg.name, ctx.step)
        if is_main_process():
            atomic_save_torch(new, path)
            log.info("%s step %d: prototypes and statistics of %d classes written to %s (%d bytes; no image)",
                     self.name, ctx.step, len(new["classes"]), path, os.path.getsize(path))
        barrier()
        super().after_step(ctx)

    def replay_saved_counts(self, ctx: StepContext) -> list[float]:
        """The old part of the counts for step t+1, from the plan this step trained with."""
        term = getattr(self, "_term", None)
        if term is None or term.replay is None:
            raise RuntimeError("STAR's replay plan is missing at the end of the step")
        return term.replay.counts["old"]


@register_method
class STARM(STAR):
    """STAR-M: STAR with DKD-M's exemplar memory (50 images on VOC)."""

    name = "STAR-M"
    description = "STAR-M: STAR with an exemplar memory of 50 images"
    default_memory = 50
