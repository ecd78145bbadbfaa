"""DKD and DKD-M (Baek et al., "Decomposed Knowledge Distillation for Class-Incremental Semantic Segmentation",
NeurIPS 2022), from the facts of its official code (cvlab-yonsei/DKD fb4693f) collected in docs/dkd.md.

What the method changes, hook by hook:

* model (``model_spec``): the framework's DeepLab-v3 with the ``aux_first`` head layout (``modules/dkd.py``): a
  one-channel *auxiliary* classifier where MiB's background row would be, then one head per step; class ``k`` is
  channel ``k``; every output is a per-class sigmoid (there is no background channel).
* losses (``terms``): mBCE on the step's classes (positives weighted by ``--pos_weight``), the auxiliary classifier
  trained towards "no" on every pixel from *detached* features (``--ac``), and at steps > 0 BCE distillation of the
  old logits (``--kd``) and of their positive and negative parts (``--dkd_pos``, ``--dkd_neg``).
* training (``param_groups``): the reference's groups (backbone lr, ASPP and classifiers 10 x lr), weight decay only
  on the new classifier at steps > 0, every BatchNorm frozen at steps > 0 (statistics and affine).
* new classes (``init_new_classifier``): every new row and bias copied from the auxiliary classifier.
* prediction (``predict``): the class with the highest sigmoid, background where none passes 0.5.
* DKD-M (``wrap_dataset``, ``before_step``): a class-balanced exemplar memory (100 images, ADE20K 300) chosen with the
  previous model and appended to the step's training set; its labels are masked like the current ones.

With AWT (``--att 25 --mask_att``) the attributed logit is the auxiliary classifier's (the default transfer source,
``cls[0]`` row 0); ``--dkd_awt_variant`` says how DKD's copy and AWT's transfer combine (docs/dkd.md).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dataset.incremental import IncrementalSegmentation, build_step_datasets
from dataset.tasks import classes_per_step
from dataset.transform import eval_preset, images_to_device, labels_to_device
from methods.base import INIT_OWN_THEN_TRANSFER, Batch, Capabilities, LossTerm, Method, StepContext, \
    plugin_options
from methods.memory import configured_size, read_memory, reader_indices, select_balanced, step_memory
from methods.registry import register_method
from modules import dkd as _layout  # noqa: F401  (registers the aux_first head layout)
from modules.dkd import AUXILIARY
from modules.heads import final_layer
from utils.constants import IGNORE_INDEX
from utils.errors import UserError
from utils.flags import WITH_TRANSFER, declare, nonnegative_float
from utils.loss import (DKD_SPLITS, decomposed_logits, multilabel_bce, never_loss, sigmoid_distillation)
from utils.progress import track

log = logging.getLogger(__name__)

HEAD_LR = 10.0  # ASPP and classifiers train at 10 x the backbone's lr (DKD, STAR)
WARMUP_FRACTION = 0.2  # DKD's and STAR's warm-up share on ADE20K
MEMORY_PSEUDO = 0.9  # old-model sigmoid from which a background pixel of a memory candidate shows an old class


def sigmoid_scores(logits: Tensor) -> Tensor:
    """Scores whose argmax is DKD's prediction: sigmoid of every class, the auxiliary channel replaced by 0.5, so a
    pixel where no class passes 0.5 is background (ties at exactly 0.5 too: argmax takes the first)."""
    probs = torch.sigmoid(logits.float())
    return torch.cat([torch.full_like(probs[:, :1], 0.5), probs[:, 1:]], dim=1)


def grid_positions(size: int, cells: int, device) -> Tensor:
    """Indices of the centre pixel of each of ``cells`` equal cells along a side of ``size`` pixels (the
    reference's ``[8::16]`` at stride 16): where a feature position sits on the label map."""
    stride = max(size // cells, 1)
    return (torch.arange(cells, device=device) * stride + stride // 2).clamp(max=size - 1)


def on_grid(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``labels`` (B, H, W) sampled at the feature positions of a (h, w) map."""
    rows = grid_positions(labels.shape[-2], size[0], labels.device)
    cols = grid_positions(labels.shape[-1], size[1], labels.device)
    return labels[:, rows][:, :, cols]


def aux_logits(model: nn.Module, features: Tensor, size: tuple[int, int]) -> Tensor:
    """The auxiliary classifier's logits on *detached* features, upsampled like the model's: its loss never reaches
    the backbone or the head (the reference feeds it ``f.detach()``)."""
    aux = final_layer(model.cls[AUXILIARY])
    small = F.conv2d(features.detach(), aux.weight.to(features.dtype), aux.bias.to(features.dtype))
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


class DeviceIds:
    """A list of class ids and its tensor on the device it was last asked for (copied once, not per iteration)."""

    def __init__(self, ids: list[int]):
        self.ids, self._tensor = list(ids), torch.as_tensor(list(ids))

    def on(self, device) -> Tensor:
        if self._tensor.device != torch.device(device):
            self._tensor = self._tensor.to(device)
        return self._tensor


def step_class_ids(ctx: StepContext) -> list[int]:
    """The label ids (= channels) of the step's classes; at step 0 without the background, which has no channel."""
    first = max(ctx.n_old, 1)
    return list(range(first, ctx.n_old + ctx.n_new))


class DKDLoss(LossTerm):
    """DKD's losses (docs/dkd.md section 2), each under its own ``loss_*`` key, multiplied by its weight."""

    name = "dkd"

    def __init__(self, *, model: nn.Module, model_old: nn.Module | None, n_old: int, class_ids: list[int],
                 pos_weight: float, weights: dict[str, float], split: str, ignore_as_negative: bool):
        self.model, self.n_old, self.class_ids, self.ids = model, n_old, class_ids, DeviceIds(class_ids)
        self.pos_weight, self.weights, self.split = float(pos_weight), weights, split
        self.ignore_as_negative = ignore_as_negative
        self.needs_old_model = model_old is not None
        self.old_rows = None
        if model_old is not None:  # the teacher's rows of the old classes never change within a step
            with torch.no_grad():
                self.old_rows = model_old.classifier_rows()[1:n_old].detach().clone()

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        w, out = self.weights, {}
        first = self.class_ids[0]
        if w["mbce"]:
            new = batch.logits[:, first:first + len(self.class_ids)]
            out["loss_mbce"] = w["mbce"] * multilabel_bce(new, batch.labels, self.ids.on(new.device), self.pos_weight,
                                                          self.ignore_as_negative)
        features = batch.extras["pre_logits"]
        if w["ac"]:
            out["loss_ac"] = w["ac"] * never_loss(aux_logits(self.model, features, batch.logits.shape[-2:]))
        if batch.logits_old is None or self.n_old <= 1:
            return out
        if w["kd"]:
            out["loss_kd"] = w["kd"] * sigmoid_distillation(batch.logits[:, 1:self.n_old],
                                                            batch.logits_old[:, 1:self.n_old])
        if w["dkd_pos"] or w["dkd_neg"]:
            rows = self.model.classifier_rows()[1:self.n_old]
            pos, neg = decomposed_logits(features, rows, self.split)
            with torch.no_grad():
                pos_old, neg_old = decomposed_logits(batch.extras_old["pre_logits"], self.old_rows.to(features.device),
                                                     self.split)
            if w["dkd_pos"]:
                out["loss_dkd_pos"] = w["dkd_pos"] * sigmoid_distillation(pos, pos_old)
            if w["dkd_neg"]:
                out["loss_dkd_neg"] = w["dkd_neg"] * sigmoid_distillation(neg, neg_old)
        return out


class WithMemory(Dataset):
    """The step's training set followed by ``size`` exemplar slots, filled once the memory is chosen (before the
    first batch; the loader's length is fixed when it is built). Fewer chosen images than slots repeat in turn."""

    def __init__(self, data: Dataset, size: int):
        self.data, self.size, self.memory = data, int(size), None

    def __len__(self) -> int:
        return len(self.data) + self.size

    def __getitem__(self, index: int):
        n = len(self.data)
        if index < n:
            return self.data[index]
        if self.memory is None:
            raise RuntimeError("the exemplar memory was read before it was chosen (Method.before_step)")
        return self.memory[(index - n) % len(self.memory)]


# ------------------------------------------------------------------------------------------------ the method
@register_method
class DKD(Method):
    """DKD: sigmoid outputs, auxiliary classifier, decomposed distillation, frozen BatchNorm after step 0."""

    name = "DKD"
    description = "DKD (NeurIPS 2022): sigmoid classifiers, auxiliary classifier init, decomposed distillation"
    capabilities = Capabilities(domain_incremental=False, builds_terms=False, default_param_groups=False,
                                classifier_init=INIT_OWN_THEN_TRANSFER, exemplar_memory=True)
    default_memory = 0
    memory_defaults: dict = {}  # per-dataset memory size of the -M variant (others: default_memory)
    pos_weights = {"ade": (35.0, 35.0)}  # (step 0, later steps); every other dataset VOC's
    pos_weight_default = (2.0, 1.0)
    decay_only_new = True  # steps > 0: weight decay on the new classifier only
    new_head_lr = HEAD_LR

    dataset_presets = {"ade": {"lr_policy": "warm_poly", "warmup_fraction": WARMUP_FRACTION}}

    @classmethod
    def preset_for(cls, dataset: str | None) -> dict:
        return dict(cls.dataset_presets.get(dataset or "", {}))

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        for flag, default, what in (("mbce", 1.0, "mBCE on the step's classes"),
                                    ("kd", 5.0, "BCE distillation of the old logits"),
                                    ("dkd_pos", 5.0, "distillation of the positive parts of the old logits"),
                                    ("dkd_neg", 5.0, "distillation of the negative parts of the old logits"),
                                    ("ac", 1.0, "the auxiliary classifier's loss (0: no auxiliary classifier "
                                                "training and new classifiers keep their random init)")):
            group.add_argument(f"--{flag}", type=nonnegative_float, default=default,
                               help=f"DKD/STAR: weight of {what} (default {default:g})")
        group.add_argument("--pos_weight", type=nonnegative_float, default=None,
                           help="DKD/STAR: weight of the positive pixels in mBCE (default: DKD VOC 2 at step 0 and "
                                "1 later, ADE20K 35; STAR VOC 4, ADE20K 30)")
        group.add_argument("--freeze_bn", action=argparse.BooleanOptionalAction, default=None,
                           help="DKD/STAR: BatchNorm frozen (eval mode, affine not trained) at this step; default: "
                                "at steps > 0, as the reference scripts pass it there; --no-freeze_bn trains it")
        group.add_argument("--dkd_split", default="weight", choices=list(DKD_SPLITS),
                           help="DKD: how an old logit is split into positive and negative parts: weight = by the "
                                "sign of each classifier weight (the reference code), product = by the sign of each "
                                "feature x weight product (the paper); they differ where a feature is negative")
        group.add_argument("--mbce_ignore", default="negative", choices=["negative", "ignore"],
                           help="DKD/STAR: pixels labelled 255 in mBCE: negative = a negative of every class, "
                                "counted in the mean (the reference); ignore = left out")
        declare(group.add_argument("--dkd_awt_variant", default="replace", choices=["replace", "add"],
                                   help="DKD with --att: replace = DKD copies the auxiliary bias and AWT sets the new "
                                        "weights (its transfer on the random init); add = DKD's full copy, then AWT "
                                        "adds on the attributed channels (docs/dkd.md)"),
                requires=WITH_TRANSFER)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.dkd = plugin_options(DKD, cfg)  # DKD's flags, which its descendants (STAR) read too
        self.memory_set: WithMemory | None = None

    # ---- settings ----------------------------------------------------------------------------------------------
    def memory_size(self) -> int:
        return configured_size(self.cfg, self.default_memory, self.memory_defaults)

    def pos_weight(self, step: int) -> float:
        if self.dkd.pos_weight is not None:
            return float(self.dkd.pos_weight)
        first, later = self.pos_weights.get(self.cfg.dataset, self.pos_weight_default)
        return first if step == 0 else later

    def bn_frozen(self, step: int) -> bool:
        return step > 0 if self.dkd.freeze_bn is None else bool(self.dkd.freeze_bn)

    def loss_weights(self) -> dict[str, float]:
        o = self.dkd
        return {"mbce": o.mbce, "kd": o.kd, "dkd_pos": o.dkd_pos, "dkd_neg": o.dkd_neg, "ac": o.ac}

    # ---- model -------------------------------------------------------------------------------------------------
    def model_spec(self, spec: Any, step: int) -> Any:
        return spec.replace(head_layout="aux_first")

    @torch.no_grad()
    def init_new_classifier(self, ctx: StepContext) -> bool:
        """Every new row and bias := the auxiliary classifier's (DKD, when it trains one: ``--ac`` > 0); with an AWT
        attribution mask and ``--dkd_awt_variant replace`` only the bias, AWT sets the weights."""
        if not self.dkd.ac:
            log.info("step %d: --ac 0: the new classifier keeps its random initialisation (DKD)", ctx.step)
            return False
        aux, new = final_layer(ctx.model.cls[AUXILIARY]), final_layer(ctx.model.cls[-1])
        new.bias.copy_(aux.bias[0].expand_as(new.bias))
        transfer = ctx.method.init_plan.transfer if ctx.method is not None else None
        awt_replaces = (transfer or {}).get("mask_source") is not None and self.dkd.dkd_awt_variant == "replace"
        if not awt_replaces:
            new.weight.copy_(aux.weight[0:1].expand_as(new.weight))
        log.info("step %d: new classifier initialised from the auxiliary classifier (%s)", ctx.step,
                 "bias; AWT sets the weights" if awt_replaces else "weights and bias")
        return True

    # ---- optimisation --------------------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, step: int) -> list[dict]:
        if self.bn_frozen(step):
            model.fix_bn()  # eval mode and no affine update: BN parameters leave the optimiser

        def trainable(params):
            return [p for p in params if p.requires_grad]

        wd = self.cfg.weight_decay
        old_wd = 0.0 if step > 0 and self.decay_only_new else wd
        groups = [{"params": trainable(model.body.parameters()), "lr": lr, "weight_decay": old_wd},
                  {"params": trainable(model.head.parameters()), "lr": HEAD_LR * lr, "weight_decay": old_wd}]
        if step == 0:
            groups.append({"params": trainable(model.cls.parameters()), "lr": HEAD_LR * lr, "weight_decay": wd})
        else:
            groups.append({"params": trainable(p for c in list(model.cls)[:-1] for p in c.parameters()),
                           "lr": HEAD_LR * lr, "weight_decay": old_wd})
            groups.append({"params": trainable(model.cls[-1].parameters()), "lr": self.new_head_lr * lr,
                           "weight_decay": wd})
        return [g for g in groups if g["params"]]

    # ---- losses ------------------------------------------------------------------------------------------------
    def terms(self, ctx: StepContext) -> list[LossTerm]:
        return [DKDLoss(model=ctx.model, model_old=ctx.model_old, n_old=ctx.n_old, class_ids=step_class_ids(ctx),
                        pos_weight=self.pos_weight(ctx.step), weights=self.loss_weights(), split=self.dkd.dkd_split,
                        ignore_as_negative=self.dkd.mbce_ignore == "negative")]

    # ---- exemplar memory (the -M variants) --------------------------------------------------------------------------
    def wrap_dataset(self, split: str, dataset, step: int):
        if split != "train" or step == 0 or self.memory_size() == 0:
            return dataset
        self.memory_set = WithMemory(dataset, self.memory_size())
        return self.memory_set

    def before_step(self, ctx: StepContext) -> None:
        if self.memory_set is not None and ctx.step > 0:
            self.memory_set.memory = self.load_memory(ctx)

    def load_memory(self, ctx: StepContext) -> Dataset:
        size = self.memory_size()
        images = step_memory(self.cfg, ctx.step, size, self.name, lambda path: self.choose_memory(ctx, path, size))
        memory = copy.copy(ctx.train_dataset)  # the step's masking (old classes -> 0) and training augmentation
        memory.idxs = np.asarray(reader_indices(memory.reader, images), dtype=np.int64)
        memory.description = f"{self.name} memory of step {ctx.step}"
        return memory

    @torch.no_grad()
    def choose_memory(self, ctx: StepContext, path: str, size: int) -> list[list]:
        """Candidates (the memory of step t-1 and every training image of step t-1) described on a resized centre
        crop by the classes they show (the step-(t-1) labels; at t > 1 background pixels the old model gives an old
        class with sigmoid >= 0.9), then the class-balanced selection of ``methods.memory``."""
        step = ctx.step
        previous = read_memory(path).get(f"step_{step - 1}", {}).get("memory_candidates", []) if step > 1 else []
        data = build_step_datasets(self.cfg, step - 1)[0]
        if not isinstance(data, IncrementalSegmentation):
            raise UserError(f"{self.name} needs a class-incremental dataset for its memory")
        data.transform = eval_preset(self.cfg.crop_size, True)
        loader = DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
        candidates, seen = [list(c) for c in previous], 0
        for images, labels in track(loader, f"{self.name} step {step}: memory candidates of step {step - 1}"):
            labels = labels_to_device(labels, ctx.device)
            if step > 1:
                with ctx.autocast():
                    logits = ctx.model_old(images_to_device(images, ctx.device))[0]
                scores = sigmoid_scores(logits)
                best, cls = scores[:, 1:].max(dim=1)
                labels = torch.where((labels == 0) & (best >= MEMORY_PSEUDO), cls + 1, labels)
            for b in range(labels.shape[0]):
                present = [c for c in torch.unique(labels[b]).tolist() if 0 < c != IGNORE_INDEX]
                fg = int(((labels[b] > 0) & (labels[b] != IGNORE_INDEX)).sum())
                image = os.path.relpath(data.sample_path(seen + b)[0], data.reader.root)
                candidates.append([image, len(present), fg, sorted(present)])
            seen += labels.shape[0]
        old_classes = list(range(1, sum(classes_per_step(self.cfg.dataset, self.cfg.task, step)[:-1])))
        rng = np.random.default_rng([int(self.cfg.random_seed), step])
        selected = select_balanced(candidates, old_classes, size, rng)
        if not selected:
            raise UserError(f"{self.name} step {step}: no training image of step {step - 1} shows an old class; the "
                            "memory would be empty (use --mem_size 0)")
        return selected

    def after_step(self, ctx: StepContext) -> None:
        if self.memory_set is not None:
            self.memory_set.memory = None

    # ---- evaluation --------------------------------------------------------------------------------------------------
    def predict(self, logits: Tensor) -> Tensor:
        return sigmoid_scores(logits)


@register_method
class DKDM(DKD):
    """DKD-M: DKD with a class-balanced exemplar memory appended to every step's training set."""

    name = "DKD-M"
    description = "DKD-M: DKD with an exemplar memory (100 images on VOC, 300 on ADE20K)"
    default_memory = 100
    memory_defaults = {"ade": 300}
