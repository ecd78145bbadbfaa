"""SSUL and SSUL-M (Cha et al., "SSUL: Semantic Segmentation with Unknown Label for Exemplar-based
Class-Incremental Learning", NeurIPS 2021), from the official code (clovaai/SSUL e08ee9c) as docs/ssul.md describes.

What the method changes, hook by hook:

* model (``model_spec``): DeepLab-v3 on a torchvision-layout ResNet with plain BatchNorm (``resnet101`` means
  ``tv_resnet101`` here), torchvision's ASPP head (rates 6/12/18 at output stride 16), one 3x3 conv-BN-ReLU-1x1
  head per step, an *unknown* and a *background* head of one channel each in front (``unknown_first`` layout:
  channel 0 unknown, 1 background, then the classes), backbone BN momentum 0.01; sigmoid outputs.
* labels (``compose_batch``): every label y != 255 becomes y + 1 and background pixels that are salient become
  unknown (0). VOC reads SSUL's saliency maps (``saliency_map/<id>.png``); datasets without them (ADE20K,
  Cityscapes) turn all background into unknown, as SSUL does on ADE. SSUL-M replaces a random half of each batch
  with memory samples (``methods/memory.py``).
* losses (``terms``): at step t > 0 background and unknown pixels take the previous model's most confident old
  class when its sigmoid score reaches ``--pseudo_thresh`` (0.7); then BCE on one-hot targets over every channel,
  summed over channels and averaged over the non-ignored pixels.
* training (``param_groups``): step 0 trains everything, the backbone at lr/10 (SSUL's hard-coded 0.001 / 0.01 for
  lr 0.01); at t > 0 only the new head and the unknown head (lr) and the background head (lr x 1e-4) train, and
  every BatchNorm is frozen (eval mode, affine parameters fixed).
* new classes (``init_new_classifier``): the new head starts as a copy of the unknown head (3x3 conv, BN, and its
  1x1 row repeated for every new class).
* prediction (``predict``): sigmoid, the unknown probability added to the background's, the unknown channel
  dropped.

With AWT (``--att 25 --mask_att``) the attributed logit is the unknown one, at the input of the unknown head's 1x1
conv, and AWT transfers from the unknown classifier (``transfer_source``). SSUL+AWT's code is not public; the two
readings of docs/ssul.md section 13 are ``--ssul_awt_variant replace`` (default: SSUL copies the 3x3 conv, BN and
the bias, AWT adds the unknown weights on the attributed channels to the new 1x1 conv's random initialisation, the
closest to AWT's own definition) and ``add`` (SSUL's full copy, then AWT adds on the attributed channels).
``--ssul_awt_logit background`` is the ablation that attributes the background logit and transfers from the
background head.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dataset.incremental import IncrementalSegmentation, build_step_datasets
from dataset.tasks import classes_per_step, get_task_labels
from dataset.transform import TRAIN_PRESETS, eval_preset, images_to_device, labels_to_device
from methods.base import INIT_OWN_THEN_TRANSFER, Batch, Capabilities, LossTerm, Method, StepContext, TrainInputs, \
    TransferSource
from methods.memory import (MemoryFeeder, configured_size, mix_rows, read_memory, reader_indices, select_balanced,
                            step_memory)
from methods.registry import register_method
from models import BACKBONES, family_in_layout
from modules import ssul as _parts  # noqa: F401  (registers the conv_head classifier and the unknown_first layout)
from modules.heads import final_layer
from utils.constants import IGNORE_INDEX
from utils.data import build_loader
from utils.errors import UserError
from utils.flags import WITH_TRANSFER, declare
from utils.loss import bce_mean_over_valid
from utils.progress import track

log = logging.getLogger(__name__)

UNKNOWN, BACKGROUND = 0, 1  # output channels of the unknown_first layout; class k >= 1 is channel k + 1
MEMORY_DEFAULT = {"ade": 300}  # SSUL-M's memory size per dataset (README); 100 elsewhere (VOC's)
BACKGROUND_LR = 1e-4  # the background head's lr factor at steps > 0
BACKBONE_LR = 0.1  # step 0: backbone lr / head lr (SSUL: 0.001 / 0.01)

# ------------------------------------------------------------------------------------------------ labels and loss
def unknown_relabel(labels: Tensor, saliency: Tensor | None) -> Tensor:
    """Shift every label but 255 by one (background 0 -> 1), then salient background -> 0 (unknown); without a
    saliency map every background pixel becomes unknown."""
    shifted = torch.where(labels == IGNORE_INDEX, labels, labels + 1)
    background = shifted == BACKGROUND
    unknown = background if saliency is None else background & (saliency > 0)
    return torch.where(unknown, torch.zeros_like(shifted), shifted)


def pseudo_label(labels: Tensor, logits_old: Tensor, threshold: float) -> Tensor:
    """Unknown and background pixels (``label <= 1``) take the old model's top class when it is an old foreground
    class (``> 1``) with sigmoid score ``>= threshold``."""
    scores, predicted = torch.sigmoid(logits_old.float()).max(dim=1)
    take = (labels <= BACKGROUND) & (predicted > BACKGROUND) & (scores >= threshold)
    return torch.where(take, predicted, labels)


def bce_with_ignore(logits: Tensor, labels: Tensor) -> Tensor:
    """SSUL's ``BCEWithLogitsLossWithIgnoreIndex``: one-hot targets over the C channels, BCE summed over channels,
    mean over the pixels that are not ignored (``utils.loss.bce_mean_over_valid``)."""
    return bce_mean_over_valid(logits, labels)


def merge_unknown(logits: Tensor) -> Tensor:
    """Scores in the label space: sigmoid, unknown added to background, the unknown channel dropped."""
    probs = torch.sigmoid(logits.float())
    return torch.cat([probs[:, BACKGROUND:BACKGROUND + 1] + probs[:, UNKNOWN:UNKNOWN + 1],
                      probs[:, BACKGROUND + 1:]], dim=1)


class SSULLoss(LossTerm):
    """Pseudo-labels from the previous model (t > 0), then BCE over every channel."""

    name = "ssul"

    def __init__(self, threshold: float, pseudo: bool):
        self.threshold, self.pseudo = float(threshold), bool(pseudo)
        self.needs_old_model = self.pseudo

    def prepare(self, batch: Batch) -> None:
        if self.pseudo and batch.logits_old is not None:
            batch.original_labels = batch.labels
            batch.labels = pseudo_label(batch.labels, batch.logits_old, self.threshold)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        return {"loss_bce": bce_with_ignore(batch.logits, batch.labels)}


# ------------------------------------------------------------------------------------------------ the method
@register_method
class SSUL(Method):
    """SSUL: unknown label, frozen network after step 0, sigmoid heads, weight transfer from unknown."""

    name = "SSUL"
    preset = {"lr_min": 1e-6}  # SSUL's poly schedule never goes below 1e-6
    description = "SSUL (NeurIPS 2021): unknown label from saliency, pseudo-labels, frozen network after step 0"
    capabilities = Capabilities(domain_incremental=False, builds_terms=False, default_param_groups=False,
                                classifier_init=INIT_OWN_THEN_TRANSFER, classifier="conv_head",
                                exemplar_memory=True)
    default_memory = 0

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--pseudo_thresh", type=float, default=0.7,
                           help="SSUL: sigmoid score from which the previous model's old class labels a "
                                "background/unknown pixel")
        declare(group.add_argument("--ssul_awt_variant", default="replace", choices=["replace", "add"],
                                   help="with --att: replace = SSUL copies the unknown head's 3x3 conv, BN and bias "
                                        "and AWT adds its weights on the attributed channels to a random 1x1 conv; "
                                        "add = SSUL's full copy, then AWT adds (docs/ssul.md)"),
                requires=WITH_TRANSFER)
        declare(group.add_argument("--ssul_awt_logit", default="unknown", choices=["unknown", "background"],
                                   help="with --att: the logit attributed and the head transferred from, SSUL's own "
                                        "copy included (background: the ablation); refused without AWT"),
                requires=WITH_TRANSFER)
        group.add_argument("--ssul_memory_unshifted", action="store_true",
                           help="SSUL-M: reproduce the upstream bug that leaves memory labels unshifted (background "
                                "trained as unknown, class c on channel c); default: relabelled like the rest")

    @classmethod
    def check(cls, cfg: Any) -> None:
        if not 0.0 <= float(cfg.pseudo_thresh) <= 1.0:
            raise UserError(f"--pseudo_thresh {cfg.pseudo_thresh} is not a probability in [0, 1]")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.memory: MemoryFeeder | None = None
        self.source_head = BACKGROUND if self.options.ssul_awt_logit == "background" else UNKNOWN

    # ---- sizes -------------------------------------------------------------------------------------------------
    def memory_size(self) -> int:
        return configured_size(self.cfg, self.default_memory, MEMORY_DEFAULT)

    # ---- model -------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        # SSUL's ResNets are torchvision's (its ImageNet weights); other families (transformers) stay as they are
        backbone = spec.backbone
        if BACKBONES.get_entry(backbone, "--backbone").layout == "inplace_abn":
            backbone = family_in_layout(backbone, "torchvision")
        return spec.replace(backbone=backbone, head="aspp",
                            classifier=self.capabilities.classifier, head_layout="unknown_first",
                            backbone_bn_momentum=0.01)

    def transfer_source(self, model: nn.Module) -> TransferSource:
        return TransferSource(final_layer(model.cls[self.source_head]), 0)

    @torch.no_grad()
    def init_new_classifier(self, ctx: StepContext) -> bool:
        """The new head from the source head (unknown by default): 3x3 conv, BN (weights and statistics) and, unless
        AWT replaces it, the 1x1 row for every new class; the bias always."""
        model = ctx.model
        source, new = model.cls[self.source_head], model.cls[-1]
        for k in (0, 1):  # the 3x3 conv and the BN of the head
            new[k].load_state_dict(source[k].state_dict())
        src_final, new_final = final_layer(source), final_layer(new)
        new_final.bias.copy_(src_final.bias[0].expand_as(new_final.bias))
        transfer = ctx.method.init_plan.transfer if ctx.method is not None else None
        awt_replaces = (transfer or {}).get("mask_source") == "attribution" and self.options.ssul_awt_variant == "replace"
        if not awt_replaces:
            new_final.weight.copy_(src_final.weight[0:1].expand_as(new_final.weight))
        log.info("step %d: new head initialised from the %s head (%s)", ctx.step,
                 "unknown" if self.source_head == UNKNOWN else "background",
                 "3x3 conv, BN and bias; AWT sets the 1x1 weights" if awt_replaces else "3x3 conv, BN and 1x1 rows")
        return True

    # ---- optimisation --------------------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        wd = self.cfg.weight_decay
        if step == 0:
            rest = [p for part in (model.head, model.cls) for p in part.parameters()]
            return [{"params": list(model.body.parameters()), "lr": lr * BACKBONE_LR, "weight_decay": wd},
                    {"params": rest, "lr": lr, "weight_decay": wd}]
        for p in model.parameters():
            p.requires_grad_(False)
        trained = ((model.cls[-1], lr), (model.cls[UNKNOWN], lr), (model.cls[BACKGROUND], lr * BACKGROUND_LR))
        for head, _ in trained:
            for p in head.parameters():
                p.requires_grad_(True)
        model.fix_bn()  # every BN in eval mode with frozen affine parameters, those of the trained heads too
        return [{"params": [p for p in head.parameters() if p.requires_grad], "lr": head_lr, "weight_decay": wd}
                for head, head_lr in trained]

    # ---- data --------------------------------------------------------------------------------------------------------
    def wrap_dataset(self, split: str, dataset, step: int):
        if split != "train" or not isinstance(dataset, IncrementalSegmentation):
            return dataset
        if "saliency" in dataset.reader.AUX:
            return dataset.with_aux(("saliency",))
        log.info("%s has no saliency maps: every background pixel of the training labels becomes unknown (SSUL's "
                 "rule on ADE20K)", self.cfg.dataset)
        return dataset

    def compose_batch(self, inputs: TrainInputs) -> TrainInputs:
        aux = dict(inputs.aux)
        labels = unknown_relabel(inputs.labels, aux.pop("saliency", None))
        images = inputs.images
        if self.memory is not None:
            m_images, m_labels, m_aux = _split(self.memory.next())
            device = images.device
            m_images = images_to_device(m_images, device,
                                        channels_last=images.is_contiguous(memory_format=torch.channels_last)
                                        and not images.is_contiguous())
            m_labels = labels_to_device(m_labels, device)
            if not self.options.ssul_memory_unshifted:
                sal = m_aux.get("saliency")
                m_labels = unknown_relabel(m_labels, sal.to(device) if sal is not None else None)
            rows = mix_rows(images.shape[0]).to(device)
            images, labels = images.clone(), labels.clone()
            images[rows] = m_images[rows].to(images.dtype)
            labels[rows] = m_labels[rows]
        return TrainInputs(images, labels, aux, inputs.forward_kwargs)

    # ---- losses ----------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list[LossTerm]:
        return [SSULLoss(self.options.pseudo_thresh, pseudo=ctx.step > 0)]

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        self.memory = None
        size = self.memory_size()
        if ctx.step == 0 or size == 0:
            return
        images = step_memory(self.cfg, ctx.step, size, self.name,
                             lambda path: self.build_memory(ctx, path, size))
        self.memory = MemoryFeeder(self.memory_loader(ctx, images))

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        if self.memory is not None:
            self.memory.begin_epoch(epoch)

    def after_step(self, ctx: StepContext) -> None:
        self.memory = None

    # ---- memory ----------------------------------------------------------------------------------------------------
    def build_memory(self, ctx: StepContext, path: str, size: int) -> list[list]:
        """Candidates (the memory of step t-1 and every training image of step t-1) described on a resized centre
        crop, then the class-balanced selection."""
        step = ctx.step
        previous = read_memory(path).get(f"step_{step - 1}", {}).get("memory_candidates", []) if step > 1 else []
        if step > 1 and not previous:
            log.warning("SSUL-M step %d: no memory of step %d in %s (another --step_ckpt?): candidates are the "
                        "training images of step %d only", step, step - 1, path, step - 1)
        data = build_step_datasets(self.cfg, step - 1)[0]
        data = self.wrap_dataset("train", data, step - 1)
        data.transform = eval_preset(self.cfg.crop_size, True)
        loader = DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
        model_old = ctx.model_old
        candidates = [list(c) for c in previous]
        seen = 0
        for item in track(loader, f"SSUL-M step {step}: memory candidates of step {step - 1} (batches)"):
            images, labels, aux = _split(item)
            labels = unknown_relabel(labels_to_device(labels, ctx.device),
                                     aux["saliency"].to(ctx.device) if "saliency" in aux else None)
            if step > 1:
                with torch.no_grad(), ctx.autocast():
                    logits = model_old(images_to_device(images, ctx.device))[0]
                labels = pseudo_label(labels, logits, 0.7)  # upstream hard-codes 0.7 here
            for b in range(labels.shape[0]):
                image = data.sample_path(seen + b)[0]
                present = torch.unique(labels[b]).tolist()
                classes = sorted(c - 1 for c in present if BACKGROUND < c != IGNORE_INDEX)
                fg = int(((labels[b] > BACKGROUND) & (labels[b] != IGNORE_INDEX)).sum())
                candidates.append([_relative(image, data.reader.root), len(classes), fg, classes])
            seen += labels.shape[0]
        old_classes = list(range(1, sum(classes_per_step(self.cfg.dataset, self.cfg.task, step)[:-1])))
        rng = np.random.default_rng([int(self.cfg.random_seed), step])
        return select_balanced(candidates, old_classes, size, rng)

    def memory_loader(self, ctx: StepContext, images: list[str]):
        """Memory images with the labels of every class seen up to this step (old classes too), training
        augmentation; the list repeated until it fills a batch."""
        labels, labels_old = get_task_labels(self.cfg.dataset, self.cfg.task, ctx.step)
        train = build_step_datasets(self.cfg, ctx.step)[0]
        idxs = reader_indices(train.reader, images)
        while len(idxs) < self.cfg.batch_size:
            idxs = idxs * 2
        transform = TRAIN_PRESETS[self.cfg.train_augment](self.cfg.crop_size)
        memory = IncrementalSegmentation(train.reader, labels=labels, labels_old=labels_old, masking="current+old",
                                         transform=transform, idxs=idxs, description=f"SSUL-M memory of step {ctx.step}")
        if "saliency" in train.reader.AUX and not self.options.ssul_memory_unshifted:
            memory = memory.with_aux(("saliency",))
        return build_loader(memory, batch_size=self.cfg.batch_size, train=True, num_workers=self.cfg.num_workers,
                            seed=self.cfg.random_seed + 7919 * ctx.step)

    # ---- evaluation --------------------------------------------------------------------------------------------------
    def predict(self, logits: Tensor) -> Tensor:
        return merge_unknown(logits)


@register_method
class SSULM(SSUL):
    """SSUL-M: SSUL with a class-balanced exemplar memory mixed into every batch."""

    name = "SSUL-M"
    description = "SSUL-M: SSUL with an exemplar memory (100 images on VOC, 300 on ADE20K)"
    default_memory = 100  # SSUL's flags (inherited) serve both, declared once in SSUL's group


def _split(item) -> tuple[Tensor, Tensor, dict]:
    if len(item) == 3:
        return item[0], item[1], item[2]
    return item[0], item[1], {}


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root)
