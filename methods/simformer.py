"""SimFormer (Chen et al., NeurIPS 2022; simformer.md sections 2-6, from bcmi/SimFormer, CC BY-NC, re-implemented
from the facts): weak-shot segmentation on a mask-classification head. Base classes have pixel labels, novel classes
image labels only (a weak-shot task, ``dataset/weak_shot.py``). Its two similarity transfers:

* proposal-pixel: MaskFormer itself (a mask is the similarity of a query with the pixel embeddings), trained by the
  set losses with novel classes as mask-free targets plus the complementary loss (``--mask_loss``, ``--mask_comp``
  of ``methods/mask_classification.py``, which this method switches on);
* pixel-pixel (``--pair_loss``): a small network (SimNet) learns from base pixel pairs whether two pixels share a
  class, on detached pixel embeddings, and is distilled onto the novel-class score vectors of non-base pixel pairs
  (``--pair_distill``), on the last decoder layer only.

Pairs are images of the same batch: each image's partner is an image sharing one of its novel classes (random among
them), else a random other image (SimFormer draws partners from a precomputed list of the whole dataset, one pair
per GPU: docs/simformer.md).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.tasks import score_groups
from methods.base import Batch, Capabilities, LossTerm, StepContext
from methods.outside_ddp import OutsideDDPSync
from methods.pixel_pairs import (BalanceCounts, SimNet, add_pair_flags, changed_pair_flags, choose_partners,
                                 distillation_loss, similarity_loss)
from methods.presets import TermMethod
from methods.registry import register_method
from utils.errors import UserError
from utils.flags import nonnegative_float

PAIR_MODES = ("cross", "self")


def _keep_eval(module: nn.Module, _inputs) -> None:
    module.eval()


def freeze_batch_norms(body: nn.Module) -> None:
    """detectron2's FrozenBN: every BatchNorm of ``body`` normalises with its stored statistics and affine
    parameters, which no longer train; a forward pre-hook keeps it in eval mode whatever ``model.train()`` says."""
    for m in body.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            m.register_forward_pre_hook(_keep_eval)


NO_DECAY = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
            nn.LocalResponseNorm, nn.Embedding)


def decay_groups(modules: list[nn.Module], body: nn.Module, lr: float, body_lr: float, wd: float) -> list[dict]:
    """Trainable parameters of ``modules`` in up to four groups: in ``body`` (lr x ``body_lr``) or not, owned by a
    norm layer or an embedding (weight decay 0) or not (``wd``)."""
    exempt = {id(p) for m in modules for sub in m.modules() if isinstance(sub, NO_DECAY)
              for p in sub.parameters(recurse=False)}
    in_body = {id(p) for p in body.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in in_body, id(p) in exempt), []).append(p)
    return [{"params": params, "lr": lr * (body_lr if is_body else 1.0), "weight_decay": 0.0 if no_wd else wd}
            for (is_body, no_wd), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


class PixelPairTransfer(LossTerm):
    """SimFormer's pixel-pixel similarity transfer on the last decoder layer: ``loss_pair_sim`` (SimNet on base
    pairs) and ``loss_pair_distill`` (SimNet's judgement of non-base pairs distilled onto the novel-class score
    vectors, for partners sharing a novel class)."""

    name = "pixel_pairs"
    order = 22

    def __init__(self, *, simnet: SimNet, novel: list[int], points: int, sim_weight: float, distill_weight: float,
                 func: str, mode: str, student: str, counts: BalanceCounts):
        self.simnet, self.novel, self.points = simnet, novel, points
        self.sim_weight, self.distill_weight, self.func = sim_weight, distill_weight, func
        self.mode, self.student, self.counts = mode, student, counts

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        extras = batch.extras
        pixels = extras["pre_logits"].float()  # (B, D, h, w) per-pixel embeddings
        h, w = pixels.shape[-2:]
        labels = F.interpolate(batch.labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        novel_labels = batch.aux.get("novel_labels")
        if novel_labels is None:
            raise UserError("--pair_loss needs a weak-shot task (items with novel_labels): use a ws* task")
        partners = choose_partners(novel_labels[:, self.novel], self.mode)
        flat = pixels.flatten(2).transpose(1, 2)  # (B, h*w, D)
        base = labels != 255
        out = {"loss_pair_sim": self.sim_weight * similarity_loss(self.simnet, self.counts, flat, labels, partners,
                                                                  self.points)}
        if self.distill_weight > 0:
            out["loss_pair_distill"] = self.distill_weight * self._distill(batch, flat, base, partners, novel_labels)
        return out

    def _distill(self, batch: Batch, flat: Tensor, base: Tensor, partners: list[int], novel_labels: Tensor) -> Tensor:
        cls = batch.extras["mask_cls"].float().softmax(-1)[..., self.novel]  # (B, Q, N)
        masks = batch.extras["mask_pred"].float().sigmoid()
        scores = torch.einsum("bqn,bqhw->bnhw", cls, masks).flatten(2).transpose(1, 2)  # (B, h*w, N)
        return distillation_loss(self.simnet, scores, flat, ~base.flatten(1), partners,
                                 novel_labels[:, self.novel], self.points, self.func, self.student)

    def state_dict(self) -> dict:
        return {"balance": self.counts.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.simnet.parameters()).device
        self.counts.load_state_dict(state.get("balance", {}), device)


@register_method
class SimFormer(TermMethod):
    """Weak-shot segmentation by dual similarity transfer on a MaskFormer head."""

    name = "SimFormer"
    description = ("weak-shot segmentation (NeurIPS 2022): MaskFormer set losses with image-labelled novel classes, "
                   "complementary loss, pixel-pair similarity transfer (--pair_loss)")
    preset = {"head": "maskformer", "mask_loss": 1.0, "mask_comp": 0.15}
    capabilities = Capabilities(domain_incremental=False, default_param_groups=False)

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--backbone_lr", type=nonnegative_float, default=0.1,
                           help="the backbone's lr = --lr x this (detectron2's BACKBONE_MULTIPLIER; SimFormer 0.1)")
        group.add_argument("--backbone_bn", default="frozen", choices=["frozen", "train"],
                           help="the backbone's BatchNorm layers: frozen (statistics and affine, detectron2's FrozenBN "
                                "of SimFormer's ResNet-50) or train")
        group.add_argument("--pair_loss", type=nonnegative_float, default=0.0,
                           help="weight of the SimNet loss on base pixel pairs (SimFormer 1.0; 0: no pixel-pixel "
                                "transfer)")
        add_pair_flags(group, "pair", {
            "distill": "with --pair_loss: weight of the distillation onto novel pairs (SimFormer: 0.1 COCO-Stuff-10K, "
                       "0.0 on its split 1, 0.5 ADE20K)",
            "points": "with --pair_loss: J, pixels sampled per image (SimFormer 100; its Table 1: 50/150)",
            "func": "with --pair_loss: the distillation loss (SimFormer: ce on COCO-Stuff-10K splits 1 and 3, cce "
                    "elsewhere)",
            "student": "with --pair_loss: the student's pairs: cross (the paper: the teacher's pairs) or self "
                       "(SimFormer's released code: the anchor image's points with themselves)"})
        group.add_argument("--pair_mode", default="cross", choices=PAIR_MODES,
                           help="with --pair_loss: pairs across two images of the batch (cross) or within one "
                                "image (self, SimFormer's Table 2 ablation)")

    @classmethod
    def check(cls, cfg: Any) -> None:
        if any(step > 0 for step in cfg.step):
            raise UserError("--method SimFormer trains one step (a weak-shot task such as coco_stuff_10k ws1); "
                            "for weak incremental steps use --method WILSON")
        if getattr(cfg, "pair_loss", 0.0) <= 0:
            changed = changed_pair_flags(cfg, "pair") + (["--pair_mode"] if cfg.pair_mode != "cross" else [])
            if changed:
                raise UserError(f"{changed[0]} sets the pixel-pair transfer: add --pair_loss W (SimFormer 1.0) "
                                "or drop it")
        if getattr(cfg, "backbone_bn", "frozen") == "frozen" and getattr(cfg, "no_pretrained", False):
            raise UserError("--backbone_bn frozen keeps the BatchNorm statistics of a pretrained backbone, and "
                            "--no_pretrained has none: add --backbone_bn train")
        if getattr(cfg, "novel_has_mask", False):
            # SimFormer*'s retraining: no class is known from image labels only, so these losses have no target
            if getattr(cfg, "pair_loss", 0.0) > 0:
                raise UserError("--pair_loss distils onto novel pixels without labels; with --novel_has_mask every "
                                "class has pixel labels: drop --pair_loss")
            if getattr(cfg, "mask_comp", 0.0) > 0:
                raise UserError("--mask_comp covers the region of classes without masks; with --novel_has_mask every "
                                "class has one: add --mask_comp 0 (SimFormer*'s retraining)")
        if getattr(cfg, "pair_loss", 0.0) > 0 and score_groups(cfg.dataset, cfg.task, 0) is None:
            raise UserError(f"--pair_loss distils onto novel classes, which only a weak-shot task has (task "
                            f"{cfg.task} of {cfg.dataset} is not one): choose a ws* task or drop --pair_loss")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.simnet: SimNet | None = None
        self.counts = BalanceCounts()

    def prepare_model(self, ctx: StepContext) -> None:
        if self.options.backbone_bn == "frozen":
            freeze_batch_norms(ctx.model.body)
        if self.options.pair_loss <= 0:
            return
        with torch.random.fork_rng(devices=[]):  # its own seed: the run's random stream is left as it was
            torch.manual_seed(self.cfg.random_seed + 1)
            self.simnet = SimNet(ctx.model.head.dim).to(ctx.device)

    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        """SimFormer's detectron2 groups: the backbone at lr x --backbone_lr, everything else (SimNet included) at
        lr; no weight decay on norm layers and embeddings (its WEIGHT_DECAY_NORM and WEIGHT_DECAY_EMBED, both 0)."""
        return decay_groups([model] + ([self.simnet] if self.simnet is not None else []), model.body, lr,
                            self.options.backbone_lr, self.cfg.weight_decay)

    def terms(self, ctx: StepContext) -> list[LossTerm]:
        # MaskFormer's losses replace the per-pixel cross-entropy
        terms = [t for t in super().terms(ctx) if t.name != "classification"]
        if self.simnet is None:
            return terms
        groups = score_groups(self.cfg.dataset, self.cfg.task, ctx.step)
        if ctx.world_size > 1:  # the SimNet trains outside the model's DistributedDataParallel
            terms.append(OutsideDDPSync(self.simnet))
        return terms + [PixelPairTransfer(simnet=self.simnet, novel=list(groups[1]), points=self.options.pair_points,
                                          sim_weight=self.options.pair_loss, distill_weight=self.options.pair_distill,
                                          func=self.options.pair_func, mode=self.options.pair_mode,
                                          student=self.options.pair_student, counts=self.counts)]

    def state_dict(self) -> dict:
        return {"simnet": self.simnet.state_dict()} if self.simnet is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.simnet is not None and "simnet" in state:
            self.simnet.load_state_dict(state["simnet"])
