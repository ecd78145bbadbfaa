"""WILSON (Cermelli et al., CVPR 2022): incremental steps learnt from image-level labels (``--weakly``; spec:
weak-steps.md section 2). A localizer on the encoder features learns the step's classes from the image labels
(nGWP + focal penalty, l_CLS) and the old classes from the old model (l_LOC); from epoch ``--pseudo_ep`` on, its
label-masked softmax, mixed with the old model's outputs, gives the segmentation head soft pseudo-labels (l_SEG), and
its PAMR-refined masks train it further (self-training). The encoder is distilled with ``--loss_de`` (ILT's term).

The localizer is this plugin's module, fresh at every weak step, in its own parameter group at ``--lr_pseudo``; the
step checkpoint stays a plain segmentation model (the localizer's weights go to the plugin's state for resuming).
WILSON's published command lines carry no ``--method``: ``--weakly`` selects this method.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.incremental import weak_old_labels
from methods.attribution import unwrap
from methods.base import Batch, Capabilities, LossTerm, StepContext, TrainInputs, WeakLabeler
from methods.presets import TermMethod
from methods.registry import register_method
from methods.pixel_pairs import BalanceCounts, SimNet, add_pair_flags, changed_pair_flags
from methods.outside_ddp import OutsideDDPSync
from methods.wilson_csd import LocalizerCSD
from methods.wilson_simformer import REGIONS, RESOLUTIONS, WeakStepTransfer
from methods.wilson_losses import (CAM_MODES, balanced_self_training_loss, image_label_loss, localization_prior_loss,
                                   mask_by_image_labels, pseudo_gtmask, segmentation_loss, soft_targets)
from modules.norm import NORM_ACT
from modules.wilson import build_localizer, denormalize, pamr
from utils.errors import UserError
from utils.flags import nonnegative_float, nonnegative_int, positive_float
from weaksup.csd import LAMBDA_ORDERS

log = logging.getLogger(__name__)

LABEL_FREE_TERMS = ("ilt",)  # registered terms that read no pixel label (the encoder distillation, --loss_de)
DROPPED_AT_WEAK_STEPS = ("classification",)  # replaced by l_SEG on pseudo-labels
STEP_CLASSIFICATION_FLAGS = ("unce", "icarl")  # options of that term that act at steps > 0 only
PRIORS = ("learned", "ce", "fixed", "none")


@dataclasses.dataclass
class Progress:
    """What the loss term needs to know of the training loop: the current epoch (0-based)."""

    epoch: int = 0


def with_prior(z: Tensor, old_small: Tensor, prior: str) -> Tensor:
    """The localizer maps with the background and old channels as ``--wilson_prior`` says (paper Table 4): learned
    (its own, trained by l_LOC), fixed (the old model's logits), none (constants: background 1, old classes 0, as
    SS's constant background logit; a reconstruction, no released code)."""
    n_old = old_small.shape[1]
    if prior == "fixed":
        return torch.cat([old_small, z[:, n_old:]], 1)
    if prior == "none":
        constant = torch.zeros_like(z[:, :n_old])
        constant[:, 0] = 1.0
        return torch.cat([constant, z[:, n_old:]], 1)
    return z


def localizer_eval_maps(localizer: nn.Module, body: Tensor, old_small: Tensor, prior: str) -> Tensor:
    """The softmax of the localizer in evaluation mode (with the prior), without gradient; its mode is kept. WILSON
    reads it before the training forward, so its normalisation statistics are those of the previous iteration."""
    was_training = localizer.training
    localizer.eval()
    try:
        with torch.no_grad():
            return with_prior(localizer(body).float(), old_small, prior).softmax(1)
    finally:
        localizer.train(was_training)


def refine(m: Tensor, images: Tensor, affinity: bool) -> Tensor:
    """PAMR of the maps ``m`` on the de-normalised images (``m`` itself without ``affinity``)."""
    if not affinity:
        return m
    with torch.no_grad():
        image = F.interpolate(denormalize(images.float()), size=m.shape[-2:], mode="bilinear", align_corners=True)
        return pamr(image, m)


def pseudo_label_map(refined: Tensor, img_labels_all: Tensor) -> Tensor:
    """int64 (B, h, w): the class of the self-training masks (``pseudo_gtmask`` of the label-masked, refined maps),
    255 where no class or several are positive."""
    positive = pseudo_gtmask(mask_by_image_labels(refined, img_labels_all))
    labels = positive.argmax(1)
    labels[positive.sum(1) < 1] = 255
    return labels


class WilsonLoss(LossTerm):
    """l_CLS + l_LOC always; from epoch ``pseudo_ep`` on l_SEG and the localizer's self-training (before it, 0 times
    the segmentation logits, as the reference, so that the head still takes part in the backward pass)."""

    name = "wilson"
    order = 20
    needs_old_model = True
    needs_features = True

    def __init__(self, *, localizer: nn.Module, progress: Progress, alpha: float, cam: str, l_seg: float,
                 pseudo_ep: int, affinity: bool, prior: str = "learned", l_self: float = 1.0,
                 cls_on_all: bool = False, csd: LocalizerCSD | None = None,
                 simformer: WeakStepTransfer | None = None):
        self.localizer, self.progress = localizer, progress
        self.alpha, self.cam, self.l_seg, self.pseudo_ep, self.affinity = alpha, cam, l_seg, pseudo_ep, affinity
        self.prior, self.l_self = prior, l_self
        self.cls_on_all = cls_on_all  # l_CLS over every class (the image labels name the old classes too)
        self.csd = csd  # its rows appended after the batch's (``aux["csd"]``) are left out of WILSON's own terms
        self.simformer = simformer  # SimFormer's losses on the base / non-base regions of the target

    def prior_loss(self, z: Tensor, old_small: Tensor) -> Tensor:
        """l_LOC (learned), its CE variant (Table 4's "learned + CE": softmax CE of the localizer's old channels
        against the old model's argmax), nothing for fixed and none."""
        if self.prior == "learned":
            return localization_prior_loss(z, old_small)
        if self.prior == "ce":
            return F.cross_entropy(z[:, :old_small.shape[1]], old_small.argmax(1))
        return z.new_zeros(())

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        appended = batch.aux.get("csd")
        n = appended.n if appended is not None else batch.images.shape[0]
        body_all = batch.extras["body"]
        body = body_all[:n]
        img_all = batch.aux["img_labels"][:n].float()
        labels_new = img_all[:, -batch.n_new:]
        old_small = batch.extras_old["sem_logits_small"][:n].float()
        logits_small = batch.extras["sem_logits_small"][:n]
        m = localizer_eval_maps(self.localizer, body, old_small, self.prior)
        raw_all = self.localizer(body_all).float()
        raw = raw_all[:n]
        z = with_prior(raw, old_small, self.prior)
        out = {"loss_cls": image_label_loss(z, img_all if self.cls_on_all else labels_new, self.cam),
               "loss_loc": self.prior_loss(raw, old_small)}
        pre_logits = batch.extras["pre_logits"][:n] if self.simformer is not None else None
        image_size = tuple(batch.images.shape[-2:])
        if self.progress.epoch < self.pseudo_ep:
            out["loss_seg"] = 0 * logits_small.mean()
            if self.simformer is not None and not self.simformer.needs_pseudo_labels:
                out.update(self.simformer.loss(None, old_small, logits_small, pre_logits, labels_new, image_size))
            return out
        refined = refine(m, batch.images[:n], self.affinity)
        with torch.no_grad():
            target, q = soft_targets(mask_by_image_labels(m, img_all), old_small, self.alpha)
            pseudo = pseudo_gtmask(mask_by_image_labels(refined, img_all))
        out["loss_seg"] = self.l_seg * segmentation_loss(logits_small.float(), target, q, labels_new)
        if self.l_self > 0:
            out["loss_self"] = self.l_self * balanced_self_training_loss(z, pseudo, img_all)
        if self.simformer is not None:
            out.update(self.simformer.loss(target, old_small, logits_small, pre_logits, labels_new, image_size))
        if appended is not None:
            out.update(self.csd.loss(raw_all, appended))
        return out


@register_method
class WILSON(TermMethod):
    """WILSON's weak steps; step 0 trains on pixel labels with the registered terms (``--bce`` in WILSON's scripts)."""

    name = "WILSON"
    description = "image-level labels at steps > 0 (--weakly): localizer, PAMR, soft pseudo-labels (CVPR 2022)"
    preset = {"alpha": 0.5}
    capabilities = Capabilities(domain_incremental=False, default_param_groups=False, weak_steps=True)

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--affinity", action="store_true", default=False,
                           help="refine the localizer's maps with PAMR before the self-training masks (on in every "
                                "published WILSON script)")
        group.add_argument("--pseudo_ep", type=nonnegative_int, default=5,
                           help="epoch (0-based) from which the pseudo-labels train the segmentation head and the "
                                "localizer's self-training starts (before: l_CLS + l_LOC only); also where "
                                "--lr_policy warmup starts decaying")
        group.add_argument("--lr_pseudo", type=positive_float, default=0.01,
                           help="the localizer's learning rate (absolute, not a multiple of --lr)")
        group.add_argument("--lr_head", type=positive_float, default=10.0,
                           help="the head's and the classifiers' lr = --lr x this at weak steps (1 at step 0)")
        group.add_argument("--cam", default="ngwp", choices=CAM_MODES,
                           help="image-level pooling of the localizer maps for l_CLS: ngwp (+ focal penalty), att, "
                                "gap")
        group.add_argument("--l_seg", type=nonnegative_float, default=1.0, help="weight of l_SEG")
        group.add_argument("--l_self", type=nonnegative_float, default=1.0,
                           help="weight of the localizer's self-training (0: none, as the CAM-only baseline)")
        group.add_argument("--csd", action="store_true", default=False,
                           help="CSD on the localizer (weak-steps.md section 3; unpublished combination): from "
                                "--pseudo_ep on, each batch's images with two new classes or more get a one-new-class "
                                "image of the batch (drawn by co-occurrence); its localizer mask's foreground and "
                                "background are pasted into them and the localizer's maps of both composites are "
                                "pulled to the source's (KL); docs/wilson.md")
        group.add_argument("--csd_lambdas", default="fg-bg", choices=tuple(LAMBDA_ORDERS),
                           help="with --csd: fg-bg = 0.01 on the foreground-paste KL, 0.1 on the background-paste "
                                "KL; bg-fg = swapped (CSD's supplementary does not say which)")
        group.add_argument("--csd_pairs", type=nonnegative_int, default=0,
                           help="with --csd: composites per batch at most (0: a quarter of the batch)")
        group.add_argument("--simformer_comp", type=nonnegative_float, default=0.0,
                           help="SimFormer's complementary loss at weak steps (weak-steps.md section 4; unpublished "
                                "combination), weight (SimFormer: 0.15 COCO, 0.2 ADE; 0: off): the max of the labelled "
                                "new classes' logits must cover the pixels the pseudo-label target does not call base")
        group.add_argument("--simformer_pairs", type=nonnegative_float, default=0.0,
                           help="SimFormer's pixel-pair transfer at weak steps: weight of the SimNet loss on base "
                                "pairs of pre_logits (SimFormer 1.0; 0: off)")
        add_pair_flags(group, "simformer", {
            "distill": "with --simformer_pairs: weight of the distillation onto the new classes' sigmoid vectors of "
                       "non-base pairs",
            "points": "with --simformer_pairs: J, points per image",
            "func": "with --simformer_pairs: the distillation function (see --pair_func)",
            "student": "with --simformer_pairs: the student's pairs (see --pair_student)"})
        group.add_argument("--simformer_conf", type=nonnegative_float, default=0.5,
                           help="with --simformer_comp / --simformer_pairs: a pixel is base when the target's argmax "
                                "is background or an old class scoring above this")
        group.add_argument("--simformer_region", default="eq7", choices=REGIONS,
                           help="with --simformer_comp / --simformer_pairs: the base region: eq7 (the confident "
                                "background / old classes of WILSON's pseudo-label target; from --pseudo_ep) or oldfg "
                                "(the old model's foreground classes with sigmoid above --simformer_conf; background "
                                "joins the new classes on the prediction side; from the first epoch)")
        group.add_argument("--simformer_res", default="feature", choices=RESOLUTIONS,
                           help="with --simformer_comp: the complementary loss at the head's resolution (feature) or "
                                "on the logits upsampled to the image (image, as SimFormer)")
        group.add_argument("--wilson_prior", default="learned", choices=PRIORS,
                           help="the localizer's background and old channels (paper Table 4; only 'learned' is in "
                                "WILSON's released code, the others are reconstructions): learned (trained by "
                                "l_LOC), ce (trained by softmax CE against the old model's argmax), fixed (the old "
                                "model's logits, no l_LOC), none (constant background 1 and old classes 0, no l_LOC)")

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not getattr(cfg, "weakly", False) and any(step > 0 for step in cfg.step):
            raise UserError("--method WILSON learns steps > 0 from image-level labels: add --weakly (or use another "
                            "method for pixel labels)")
        if not getattr(cfg, "csd", False) and (cfg.csd_lambdas != "fg-bg" or cfg.csd_pairs):
            raise UserError("--csd_lambdas / --csd_pairs set CSD's terms: add --csd or drop them")
        if getattr(cfg, "csd", False) and not getattr(cfg, "weakly", False):
            raise UserError("--csd acts on WILSON's localizer at weak steps: add --weakly (or drop --csd; for CSD "
                            "on a weakly-supervised segmentation pipeline see wsss.py)")
        simformer = getattr(cfg, "simformer_comp", 0.0) > 0 or getattr(cfg, "simformer_pairs", 0.0) > 0
        if simformer and not getattr(cfg, "weakly", False):
            raise UserError("--simformer_comp / --simformer_pairs act at weak steps: add --weakly or drop them")
        changed = changed_pair_flags(cfg, "simformer")
        if changed and not getattr(cfg, "simformer_pairs", 0.0) > 0:
            raise UserError(f"{changed[0]} sets SimFormer's pixel-pair transfer: add --simformer_pairs W or drop it")
        for flag, default in (("simformer_conf", 0.5), ("simformer_region", "eq7")):
            if getattr(cfg, flag, default) != default and not simformer:
                raise UserError(f"--{flag} sets SimFormer's base region: add --simformer_comp or --simformer_pairs, "
                                "or drop it")
        if getattr(cfg, "simformer_res", "feature") != "feature" and not getattr(cfg, "simformer_comp", 0.0) > 0:
            raise UserError("--simformer_res sets the complementary loss's resolution: add --simformer_comp W or "
                            "drop it")
        for flag in STEP_CLASSIFICATION_FLAGS:
            if getattr(cfg, flag, False):
                raise UserError(f"--{flag} changes the pixel-label loss of steps > 0, which WILSON's weak steps "
                                "replace with l_SEG on pseudo-labels (it would do nothing): drop it")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.progress = Progress()
        self.localizer: nn.Module | None = None
        self.csd: LocalizerCSD | None = None
        self.simnet: SimNet | None = None
        self.simnet_counts = BalanceCounts()  # the SimNet loss's balance window, saved with the checkpoint

    def weak(self, step: int) -> bool:
        return step > 0 and bool(getattr(self.cfg, "weakly", False))

    # ---- model -----------------------------------------------------------------------------------------------------
    def prepare_model(self, ctx: StepContext) -> None:
        if not self.weak(ctx.step):
            self.localizer, self.simnet = None, None
            return
        with torch.random.fork_rng(devices=[]):  # its own seed: the run's random stream is left as it was
            torch.manual_seed(self.cfg.random_seed + ctx.step)
            self.localizer = build_localizer(ctx.model.body.out_channels, sum(ctx.classes),
                                             NORM_ACT[self.cfg.norm_act]).to(ctx.device)
            self.simnet = (SimNet(unwrap(ctx.model).head_channels).to(ctx.device)
                           if self.options.simformer_pairs > 0 else None)
        self.simnet_counts = BalanceCounts()

    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        head_lr = lr * (self.options.lr_head if self.weak(step) else 1.0)
        wd = self.cfg.weight_decay

        def trainable(params):
            return [p for p in params if p.requires_grad]

        groups = [{"params": trainable(model.body.parameters()), "lr": lr, "weight_decay": wd},
                  {"params": trainable(model.head.parameters()), "lr": head_lr, "weight_decay": wd},
                  {"params": trainable(model.cls.parameters()), "lr": head_lr, "weight_decay": wd}]
        if self.localizer is not None:
            groups.append({"params": trainable(self.localizer.parameters()), "lr": self.options.lr_pseudo,
                           "weight_decay": wd})
        if self.simnet is not None:  # a new part of the head: the head's lr
            groups.append({"params": trainable(self.simnet.parameters()), "lr": head_lr, "weight_decay": wd})
        return [g for g in groups if g["params"]]

    def weak_labeler(self, ctx: StepContext) -> WeakLabeler | None:
        """The localizer's self-training masks as pixel labels, valid once pseudo-supervision starts (``--pseudo_ep``):
        the current model's encoder and the old model in evaluation mode (no statistics updated), no gradient."""
        if not self.weak(ctx.step):
            return None

        def labels(images: Tensor, img_labels: Tensor) -> Tensor:
            model, model_old = ctx.model, ctx.model_old
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), ctx.autocast():
                    body = model(images, ret_intermediate=True)[1]["body"]
                    old_small = model_old(images, ret_intermediate=True)[1]["sem_logits_small"]
            finally:
                model.train(was_training)
            m = localizer_eval_maps(self.localizer, body, old_small.float(), self.options.wilson_prior)
            return pseudo_label_map(refine(m, images, self.options.affinity), img_labels.float())

        return WeakLabeler(ready_epoch=int(self.options.pseudo_ep), labels=labels)

    # ---- losses ----------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list[LossTerm]:
        terms = super().terms(ctx)
        if not self.weak(ctx.step):
            return terms
        reading = [t.name for t in terms if t.name not in LABEL_FREE_TERMS + DROPPED_AT_WEAK_STEPS]
        if reading:
            raise UserError(f"the {reading[0]} loss term reads pixel labels, which a weak step (--weakly) does not "
                            "have: drop the flag that enables it (WILSON's steps use --loss_de only)")
        kept = [t for t in terms if t.name in LABEL_FREE_TERMS]
        self.csd = self.csd_part(ctx) if self.options.csd else None
        if ctx.world_size > 1:
            kept.append(OutsideDDPSync(nn.ModuleList([m for m in (self.localizer, self.simnet) if m is not None])))
        return kept + [WilsonLoss(localizer=self.localizer, progress=self.progress, alpha=self.cfg.alpha,
                                  cam=self.options.cam, l_seg=self.options.l_seg, pseudo_ep=self.options.pseudo_ep,
                                  affinity=self.options.affinity, prior=self.options.wilson_prior,
                                  l_self=self.options.l_self, cls_on_all=weak_old_labels(self.cfg), csd=self.csd,
                                  simformer=self.simformer_part(ctx))]

    def simformer_part(self, ctx: StepContext) -> WeakStepTransfer | None:
        o = self.options
        if o.simformer_comp <= 0 and self.simnet is None:
            return None
        return WeakStepTransfer(n_old=ctx.n_old, conf=o.simformer_conf, comp=o.simformer_comp, simnet=self.simnet,
                                pairs=o.simformer_pairs, distill=o.simformer_distill, points=o.simformer_points,
                                func=o.simformer_func, student=o.simformer_student, counts=self.simnet_counts,
                                region=o.simformer_region, resolution=o.simformer_res)

    def csd_part(self, ctx: StepContext) -> LocalizerCSD:
        self.step, self.labeler = ctx.step, self.weak_labeler(ctx).labels
        return LocalizerCSD(img_labels_new=ctx.train_dataset.img_labels[:, -ctx.n_new:], n_old=ctx.n_old,
                            stride=int(unwrap(ctx.model).output_stride), pairs=self.options.csd_pairs,
                            lambdas=self.options.csd_lambdas, seed=self.cfg.random_seed)

    def compose_batch(self, inputs: TrainInputs) -> TrainInputs:
        if self.csd is None or self.progress.epoch < self.options.pseudo_ep:
            return inputs
        images, img_labels, appended = self.csd.compose(inputs.images, inputs.aux["img_labels"], self.labeler,
                                                        self.progress.epoch, self.step)
        if appended is None:
            return inputs
        extra = images.shape[0] - inputs.images.shape[0]
        labels = torch.cat([inputs.labels, inputs.labels.new_full((extra, *inputs.labels.shape[1:]), 255)])
        return dataclasses.replace(inputs, images=images, labels=labels,
                                   aux={**inputs.aux, "img_labels": img_labels, "csd": appended})

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.progress.epoch = epoch
        if self.csd is not None:
            self.csd.calls = 0  # the draws of an epoch depend on (seed, step, epoch, batch): resumable

    def after_step(self, ctx: StepContext) -> None:
        self.progress.epoch = 0

    def state_dict(self) -> dict:
        state = {"localizer": self.localizer.state_dict()} if self.localizer is not None else {}
        if self.simnet is not None:
            state["simnet"] = self.simnet.state_dict()
            state["simnet_balance"] = self.simnet_counts.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.localizer is not None and "localizer" in state:
            self.localizer.load_state_dict(state["localizer"])
        if self.simnet is not None and "simnet" in state:
            self.simnet.load_state_dict(state["simnet"])
            self.simnet_counts.load_state_dict(state.get("simnet_balance", {}), next(self.simnet.parameters()).device)
