"""NeST: new-classifier pre-tuning (Xie et al., ECCV 2024), an extension of MiB, PLOP and RCIL. See docs/nest.md.

At every step > 0, before the host trains, the new classifier is *learnt* as a transformation of the old ones while
the whole model stays frozen: for new class ``c`` the weight is ``w_c = sum_j P[c, j] * (M[c, j] * W[j])`` over the
``K`` old rows ``W`` (background and every old class), the background row becomes ``P0 * (M0 * w_0)``. ``M`` and ``P``
start from a similarity pass of the old model over the step's images (:func:`similarity_init`), train for a few
epochs with MiB's unbiased CE, then fold into plain 1x1 weights (:func:`fold`) and the host trains as usual.

Combinations with AWT (docs/nest.md): ``--nest_init awt`` takes AWT's channel mask as ``M[:, 0]`` with ``P`` on the
background row (attribution as the prior); ``--two_stage`` pre-tunes the new classifier itself after AWT's (or
MiB's) transfer; AWT's ``--attribution similarity`` uses NeST's similarity as a cheap channel score.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dataset.transform import images_to_device, labels_to_device
from methods import awt
from methods.base import INIT_BY_TRANSFER, Extension, StepContext
from methods.registry import METHODS, register_extension
from modules.heads import final_layer
from utils import logger
from utils.checkpoint import safe_load, save_checkpoint
from utils.constants import IGNORE_INDEX
from utils.data import seeded_rng
from utils.dist import all_reduce_sum, barrier, get_world_size, is_main_process
from utils.errors import UserError
from utils.flags import CLASS_INCREMENTAL, mark
from utils.loss import cross_entropy, unbiased_cross_entropy, unbiased_knowledge_distillation
from utils.progress import duration, eta

log = logging.getLogger(__name__)

# Per dataset (epochs, lr scale) of the published scripts: VOC 5 epochs at the step's lr, ADE 15 epochs at 500x
# (zhengyuan-xie/ECCV24_NeST scripts/voc/*+ours_*.sh, scripts/ade/*+ours_resnet101_100-5.sh).
PRETUNE_DEFAULTS = {"voc": (5, 1.0), "ade": (15, 500.0)}
_FALLBACK = (5, 1.0)
SELECT_SIZE = 128  # the similarity pass resizes labels (nearest) and features (bilinear) to 128 x 128
PHASE_EPOCH_BASE = 1_000_000  # sampler epochs of the pre-tuning: other batches than the host's epochs 0..E-1


def _bool(text) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_nest_args(g: argparse._ActionsContainer) -> None:
    g.add_argument("--nest", action="store_true", default=False,
                   help="NeST as published: pre-tune the new classifier as a mix of the old ones (= --warm_up "
                        "--unce_in_warm); composes with MiB, PLOP and RCIL")
    g.add_argument("--warm_up", action="store_true", default=False,
                   help="the reference's switch for NeST's pre-tuning (its loss is plain CE unless --unce_in_warm)")
    g.add_argument("--two_stage", nargs="?", const=True, default=False, type=_bool,
                   help="pre-tune the new classifier's own weights (everything else frozen) after the usual "
                        "initialisation: AWT's with --att, MiB's with --init_balanced (the reference's direct tuning)")
    g.add_argument("--warm_epochs", type=int, default=None,
                   help="pre-tuning epochs (default: 5 on VOC, 15 on ADE20K, as the published scripts)")
    g.add_argument("--warm_lr_scale", type=float, default=None,
                   help="pre-tuning lr = the step's lr x this (default: 1 on VOC, 500 on ADE20K)")
    g.add_argument("--unce_in_warm", action="store_true", default=False,
                   help="MiB's unbiased CE as the pre-tuning loss (implied by --nest)")
    g.add_argument("--unkd_in_warm", action="store_true", default=False,
                   help="add MiB's unbiased distillation to the pre-tuning loss (off in every published script)")
    g.add_argument("--unkd_in_warm_factor", type=float, default=10.0, help="weight of --unkd_in_warm")
    g.add_argument("--fix_pre_cls", action="store_true", default=False,
                   help="freeze the old classifiers (background included) while the host trains (PLOP on VOC)")
    g.add_argument("--nest_init", default="similarity", choices=["similarity", "awt"],
                   help="prior of the channel importance M: NeST's similarity pass, or AWT's attribution mask on "
                        "the background row with P on the background (needs --att)")
    g.add_argument("--nest_bn", default="update", choices=["update", "frozen"],
                   help="BatchNorm statistics during pre-tuning: update (the reference: train mode) or frozen")
    g.add_argument("--nest_new_bias", default="random", choices=["random", "background"],
                   help="initial bias of the new classes: random (the reference: one default-init draw shared by "
                        "all new classes) or the trained background bias")
    g.add_argument("--nest_bias_trick", action="store_true", default=False,
                   help="apply MiB's background-bias adjustment b_0 -= log(N_new + 1) before pre-tuning (the "
                        "reference skips it under --warm_up)")
    mark(g, requires={"nest": CLASS_INCREMENTAL, "warm_up": CLASS_INCREMENTAL, "two_stage": CLASS_INCREMENTAL})


def pretune_defaults(dataset: str) -> tuple[int, float]:
    return PRETUNE_DEFAULTS.get(dataset, _FALLBACK)


def warm_epochs(cfg) -> int:
    return int(cfg.warm_epochs) if cfg.warm_epochs is not None else pretune_defaults(cfg.dataset)[0]


def warm_lr_scale(cfg) -> float:
    return float(cfg.warm_lr_scale) if cfg.warm_lr_scale is not None else pretune_defaults(cfg.dataset)[1]


def full_nest(cfg) -> bool:
    """NeST's parametrised pre-tuning (not the direct tuning of ``--two_stage``, which wins as in the reference)."""
    return bool(cfg.nest or cfg.warm_up) and not cfg.two_stage


# ================================================================================================ the math
def indicator_sums(features: Tensor, probs: Tensor, rows: Tensor) -> Tensor:
    """``sum_u 1[f_u * W > 0] * s_u`` over pixels: ``(K, D)``.

    features (N, D) pixel features, probs (N, K) softmax over the old rows, rows (K, D) old classifier rows. The sign
    test splits into ``(f > 0 and W > 0) or (f < 0 and W < 0)``, two matrix products instead of an (N, K, D) tensor."""
    pos, neg = (features > 0).to(probs.dtype), (features < 0).to(probs.dtype)
    return (probs.t() @ pos) * (rows > 0).to(probs.dtype) + (probs.t() @ neg) * (rows < 0).to(probs.dtype)


def mixing_from_importance(importance: Tensor) -> Tensor:
    """``P[c] = softmax_j(sum_d M[c, j, d])``: (n, K, D) -> (n, K)."""
    return importance.sum(dim=-1).softmax(dim=-1)


def generate_rows(mixing: Tensor, importance: Tensor, rows: Tensor) -> Tensor:
    """``w_c = sum_j P[c, j] * M[c, j] * W[j]``: (n, K), (n, K, D), (K, D) -> (n, D)."""
    return torch.einsum("nk,nkd,kd->nd", mixing, importance, rows)


class GeneratedRows(nn.Module):
    """Parametrisation of the new classifier's weight during pre-tuning: the mix of the old rows (frozen copy)."""

    def __init__(self, importance: Tensor, mixing: Tensor, old_rows: Tensor):
        super().__init__()
        self.importance = nn.Parameter(importance.clone())  # M (n, K, D)
        self.mixing = nn.Parameter(mixing.clone())  # P (n, K)
        self.register_buffer("old_rows", old_rows.detach().clone())  # W (K, D): the rows before pre-tuning

    def forward(self, original: Tensor) -> Tensor:
        rows = generate_rows(self.mixing, self.importance, self.old_rows)
        return rows.to(original.dtype).view_as(original)


class ScaledBackground(nn.Module):
    """Parametrisation of the first classifier's weight: row 0 becomes ``P0 * (M0 * w_0)``, the other rows stay."""

    def __init__(self, channels: int):
        super().__init__()
        self.importance = nn.Parameter(torch.ones(1, channels))  # M0
        self.scale = nn.Parameter(torch.ones(1, 1))  # P0

    def forward(self, original: Tensor) -> Tensor:
        w0 = original[0, :, 0, 0]
        row = (self.scale * (self.importance * w0)).to(original.dtype)
        return torch.cat([row.view(1, -1, 1, 1), original[1:]], dim=0)


def old_rows_and_biases(model, n_heads: int) -> tuple[Tensor, Tensor]:
    """The weights (K, D) and biases (K,) of the first ``n_heads`` classifiers, rows in output order."""
    layers = [final_layer(c) for c in list(model.cls)[:n_heads]]
    return (torch.cat([l.weight.detach().flatten(1) for l in layers]),
            torch.cat([l.bias.detach() for l in layers]))


@torch.no_grad()
def similarity_init(model_old, batches, n_old: int, n_new: int, device, *,
                    size: int | tuple[int, int] = SELECT_SIZE) -> dict:
    """NeST's similarity pass (spec §3.2): for every new class ``c`` (label ``n_old + c``), ``M[c]`` is the mean
    over its pixels of ``1[f_u * W > 0] * softmax(z_u)`` (K x D) with ``f`` the old model's classifier input and ``z``
    its logits (bias included), both at ``size`` x ``size``; ``P = softmax(sum_d M)``. Sums are added over ranks.

    Returns ``{"importance": (n, K, D), "mixing": (n, K), "pixels": (n,) counts}``; a class without a pixel gets the
    background row alone (``M[c, 0] = 1``, ``P[c] = one-hot(0)``: MiB's copy of the background weight)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    rows, biases = old_rows_and_biases(model_old, len(model_old.cls))
    rows, biases = rows.to(device).float(), biases.to(device).float()
    k, d = rows.shape
    sums = torch.zeros(n_new, k, d, dtype=torch.float64, device=device)
    counts = torch.zeros(n_new, dtype=torch.float64, device=device)
    for images, labels in batches:
        _, extras = model_old(images)
        lab = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        for i in range(images.shape[0]):  # one image at a time: the 128 x 128 x D features of a batch are large
            feats = F.interpolate(extras["pre_logits"][i:i + 1].float(), size=size, mode="bilinear",
                                  align_corners=False)
            feats = feats[0].permute(1, 2, 0).reshape(-1, d)
            lab_i = lab[i].reshape(-1)
            for c in range(n_new):
                sel = lab_i == n_old + c
                if not bool(sel.any()):
                    continue
                f = feats[sel]
                probs = (f @ rows.t() + biases).softmax(dim=1)
                sums[c] += indicator_sums(f, probs, rows).double()
                counts[c] += f.shape[0]
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    importance = torch.zeros(n_new, k, d, dtype=torch.float64, device=device)
    present = counts > 0
    importance[present] = sums[present] / counts[present, None, None]
    importance[~present, 0] = 1.0
    mixing = mixing_from_importance(importance)
    mixing[~present] = F.one_hot(torch.zeros(int((~present).sum()), dtype=torch.long, device=device), k).double()
    return {"importance": importance.float(), "mixing": mixing.float(), "pixels": counts.cpu()}


def unparametrize(layer: nn.Module) -> None:
    """Remove the weight's parametrisation, leaving the original Parameter, in its original place among the
    layer's parameters: the optimiser and a resumed step (built without the phase) see the same parameter order."""
    if not parametrize.is_parametrized(layer, "weight"):
        return
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    params = layer._parameters
    layer._parameters = type(params)([("weight", params["weight"]), *((k, v) for k, v in params.items()
                                                                         if k != "weight")])


@torch.no_grad()
def fold(model) -> dict:
    """Replace the pre-tuning parametrisations of ``cls[-1]`` and ``cls[0]`` by plain weights (spec §3.5): the
    generated rows; new biases rescaled to the norm of all old biases; the background row's learnt direction with its
    old norm; then every new row scaled so that the mean new-row norm equals the mean old-row norm. Returns the
    factors applied."""
    new_layer, bg_layer = final_layer(model.cls[-1]), final_layer(model.cls[0])
    w_new = new_layer.weight.detach().clone()
    w_bg = bg_layer.weight.detach().clone()
    unparametrize(new_layer)
    unparametrize(bg_layer)
    new_layer.weight.copy_(w_new)
    old_norm0 = bg_layer.weight[0].norm()
    learnt0 = w_bg[0].norm()
    bg_factor = float(old_norm0 / learnt0) if learnt0 > 0 else 1.0
    bg_layer.weight[0] = w_bg[0] * bg_factor
    _, old_biases = old_rows_and_biases(model, len(model.cls) - 1)
    bias_norm = new_layer.bias.norm()
    bias_factor = float(old_biases.norm() / bias_norm) if bias_norm > 0 else 1.0
    new_layer.bias.mul_(bias_factor)
    old_rows, _ = old_rows_and_biases(model, len(model.cls) - 1)
    new_mean = new_layer.weight.flatten(1).norm(dim=1).mean()
    align = float(old_rows.norm(dim=1).mean() / new_mean) if new_mean > 0 else 1.0
    new_layer.weight.mul_(align)
    return {"background": bg_factor, "bias": bias_factor, "align": align}


def check_plain_classifiers(model) -> None:
    for i, c in enumerate(model.cls):
        layer = final_layer(c)
        if layer is not c or not isinstance(c, nn.Conv2d) or c.kernel_size != (1, 1) or c.bias is None:
            raise UserError(f"NeST needs plain 1x1 classifiers with bias on the head's output; cls[{i}] is "
                            f"{type(c).__name__}")
    if getattr(model, "classifier_wrapper", None) is not None:
        raise UserError("NeST does not run on a model with a classifier wrapper (e.g. DropClass's drop path)")


def install(model, importance: Tensor, mixing: Tensor) -> list[nn.Parameter]:
    """Parametrise ``cls[-1].weight`` (generated rows) and ``cls[0].weight`` (scaled background row); returns NeST's
    tensors M, P, M0, P0."""
    new_layer, bg_layer = model.cls[-1], model.cls[0]
    old_rows, _ = old_rows_and_biases(model, len(model.cls) - 1)
    generated = GeneratedRows(importance.to(old_rows.device), mixing.to(old_rows.device), old_rows)
    background = ScaledBackground(old_rows.shape[1]).to(old_rows.device)
    parametrize.register_parametrization(new_layer, "weight", generated)
    parametrize.register_parametrization(bg_layer, "weight", background)
    return [generated.importance, generated.mixing, background.importance, background.scale]


# ================================================================================================ the phase
def warm_loss(logits: Tensor, labels: Tensor, n_old: int, *, unbiased: bool, logits_old: Tensor | None = None,
              kd_factor: float = 0.0) -> Tensor:
    """The pre-tuning loss: MiB's unbiased CE (or plain CE) averaged over every pixel, ignored ones included (the
    reference's ``.mean()``), plus ``kd_factor`` x MiB's unbiased distillation when given the old logits."""
    per_pixel = unbiased_cross_entropy(logits, labels, n_old) if unbiased else cross_entropy(logits, labels)
    loss = per_pixel.mean()
    if logits_old is not None and kd_factor:
        loss = loss + kd_factor * unbiased_knowledge_distillation(logits, logits_old).mean()
    return loss


def _phase_key(cfg, full: bool) -> dict:
    """What the pre-tuning depends on besides the step's data and weights; a resume with other values is refused."""
    return {"full": full, "epochs": warm_epochs(cfg), "lr_scale": warm_lr_scale(cfg), "nest_init": cfg.nest_init,
            "bn": cfg.nest_bn, "new_bias": cfg.nest_new_bias, "bias_trick": bool(cfg.nest_bias_trick),
            "unce": bool(cfg.nest or cfg.unce_in_warm), "unkd": bool(cfg.unkd_in_warm),
            "unkd_factor": float(cfg.unkd_in_warm_factor), "batch_size": int(cfg.batch_size),
            "weight_decay": float(cfg.weight_decay), "lr_power": float(cfg.lr_power)}


def phase_path(ctx: StepContext) -> str | None:
    return f"{ctx.checkpoint_path}.nest.partial.pth" if ctx.checkpoint_path else None


@register_extension
class NeST(Extension):
    """Pre-tunes the new classifier at every step > 0 with the model frozen (``--nest``), or tunes it directly after
    the usual initialisation (``--two_stage``)."""

    name = "NeST"
    switches = ("nest", "warm_up", "two_stage")
    needs_classifier = "conv1x1"
    supersedes = ("AWT",)  # NeST replaces MiB's initialisation (--init_balanced), as the reference's --warm_up does
    conflicts = ("DropClass",)

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        add_nest_args(group)

    @classmethod
    def enabled(cls, cfg, method) -> bool:
        return bool(cfg.nest or cfg.warm_up or cfg.two_stage)

    @classmethod
    def transfer_plan(cls, cfg, method):
        return {"pretune": "nest"} if full_nest(cfg) else None

    @classmethod
    def label(cls, cfg, method) -> str | None:
        if not full_nest(cfg):
            return "TwoStage"
        return "NeST-AWT" if cfg.nest_init == "awt" else "NeST"

    @classmethod
    def check(cls, cfg) -> None:
        method = METHODS[getattr(cfg, "method", None) or "FT"]
        caps = method.capabilities
        if caps.classifier_init not in (INIT_BY_TRANSFER, "own") or not caps.builds_terms:
            raise UserError(f"NeST pre-tunes a softmax classifier over background and classes with MiB's unbiased "
                            f"CE; --method {method.name} trains its own way: NeST composes with MiB, PLOP and RCIL")
        epochs = warm_epochs(cfg)
        if epochs < 0:
            raise UserError(f"--warm_epochs {epochs} must be >= 0 (0: the similarity initialisation alone)")
        if not warm_lr_scale(cfg) > 0 or not math.isfinite(warm_lr_scale(cfg)):
            raise UserError(f"--warm_lr_scale {cfg.warm_lr_scale} must be a positive number")
        if not math.isfinite(float(cfg.unkd_in_warm_factor)) or cfg.unkd_in_warm_factor < 0:
            raise UserError(f"--unkd_in_warm_factor {cfg.unkd_in_warm_factor} must be >= 0")
        awt_mask = float(cfg.att) > 0 and not cfg.no_att
        if full_nest(cfg):
            if cfg.nest_init == "awt" and not awt_mask:
                raise UserError("--nest_init awt takes AWT's channel mask as NeST's prior: add --att 25 --mask_att "
                                "(the mask AWT would transfer with)")
            if cfg.random_channels or (awt_mask and cfg.nest_init != "awt"):
                raise UserError("--nest and AWT's --att/--random_channels both initialise the new classifier: add "
                                "--nest_init awt to use AWT's mask as NeST's prior, or use --two_stage instead of "
                                "--nest to pre-tune the new classifier after AWT's transfer")
        else:
            for flag in ("nest_init", "nest_bn", "nest_new_bias"):
                if getattr(cfg, flag) != {"nest_init": "similarity", "nest_bn": "update",
                                          "nest_new_bias": "random"}[flag]:
                    raise UserError(f"--{flag} acts on NeST's parametrised pre-tuning, which --two_stage replaces "
                                    "with the direct tuning of the new classifier: remove one of them")

    # ---- the step -------------------------------------------------------------------------------------------------
    def after_init(self, ctx: StepContext) -> None:
        model = ctx.model
        if ctx.step == 0 or ctx.model_old is None or len(model.cls) <= len(ctx.model_old.cls):
            return
        if self.options.fix_pre_cls:  # also on a resume: the optimiser groups follow requires_grad
            for p in model.old_classifier_params():
                p.requires_grad_(False)
        if ctx.resume_from is not None:
            log.info("step %d: NeST pre-tuning skipped: the step continues from %s, which holds the model after "
                     "it", ctx.step, ctx.resume_from)
            return
        check_plain_classifiers(model)
        if self.cfg.backbone == "swin_b" and logger.once("nest swin_b"):
            log.warning("NeST's published --backbone swin_b is window 12 with DeepLab-v3 at OS16 rates: here that is "
                        "--backbone swin_b_w12 --head deeplabv3 --aspp_rates 6 12 18 (this run's swin_b has window 7)")
        full = full_nest(self.cfg)
        flags = {p: p.requires_grad for p in model.parameters()}
        sampler = getattr(ctx.train_loader, "sampler", None)
        sampler_epoch = getattr(sampler, "epoch", None)
        extras = self._prepare(ctx) if full else []
        try:
            trainable = extras + ([model.cls[-1].bias] if full else list(model.cls[-1].parameters()))
            self._pretune(ctx, trainable, full)
            if full:
                factors = fold(model)
                log.info("step %d: NeST folded into the new classifier (background norm x%.4g, bias norm x%.4g, "
                         "new rows x%.4g)", ctx.step, factors["background"], factors["bias"], factors["align"])
        finally:
            for layer in (model.cls[-1], model.cls[0]):
                unparametrize(layer)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            if sampler_epoch is not None:  # what the host's passes before training see (e.g. PLOP's thresholds)
                sampler.set_epoch(sampler_epoch)

    def after_step(self, ctx: StepContext) -> None:
        path = phase_path(ctx)
        if path and is_main_process() and os.path.exists(path):
            os.remove(path)

    def _prepare(self, ctx: StepContext) -> list[nn.Parameter]:
        """MiB's bias adjustment if asked, the new bias, the similarity (or AWT) prior, the parametrisations."""
        cfg, model, step = self.cfg, ctx.model, ctx.step
        n_old, n_new = ctx.n_old, ctx.n_new
        new_layer, bg_layer = model.cls[-1], model.cls[0]
        with torch.no_grad():
            if self.options.nest_bias_trick:
                bg_layer.bias[0] -= math.log(n_new + 1)
            if self.options.nest_new_bias == "background":
                new_layer.bias.fill_(float(bg_layer.bias[0]))
            else:  # the reference copies cls[0].bias[0] before the checkpoint is loaded: one default-init draw
                bound = 1.0 / math.sqrt(new_layer.weight.shape[1])
                gen = torch.Generator().manual_seed(int(cfg.random_seed) * 1009 + step)
                new_layer.bias.fill_(float(torch.empty(()).uniform_(-bound, bound, generator=gen)))
        t0 = time.perf_counter()
        model_old = ctx.model_old
        was_training = model_old.training
        model_old.eval()
        try:
            with seeded_rng(int(cfg.random_seed)):
                prior = similarity_init(model_old, self._batches(ctx, PHASE_EPOCH_BASE - 1), n_old, n_new,
                                        ctx.device)
        finally:
            model_old.train(was_training)
        absent = [n_old + c for c in range(n_new) if float(prior["pixels"][c]) == 0]
        if absent:
            log.warning("step %d: NeST's similarity pass saw no pixel of class(es) %s: their prior is the "
                        "background row alone (MiB's copy)", step, absent)
        importance, mixing = prior["importance"], prior["mixing"]
        if self.options.nest_init == "awt":
            mask = awt.compute_or_load_mask(cfg, step, model_old, ctx.device, dataset=ctx.train_dataset)
            mask = mask.reshape(-1, mask.shape[-1]).to(importance.device).float().expand(n_new, -1)
            importance = importance.clone()
            importance[:, 0] = mask
            mixing = F.one_hot(torch.zeros(n_new, dtype=torch.long), importance.shape[1]).float().to(importance)
        log.info("step %d: NeST prior from %s over %d pixels of the new classes in %s", step,
                 "AWT's mask and the similarity pass" if self.options.nest_init == "awt" else "the similarity pass",
                 int(prior["pixels"].sum()), duration(time.perf_counter() - t0))
        return install(model, importance, mixing)

    def _batches(self, ctx: StepContext, epoch: int):
        """The step's training batches (its sampler, augmentation and sharding) of a phase epoch, on the device."""
        loader = ctx.train_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for item in loader:
            yield images_to_device(item[0], ctx.device), labels_to_device(item[1], ctx.device)

    def _pretune(self, ctx: StepContext, trainable: list[nn.Parameter], full: bool) -> None:
        cfg, model, step = self.cfg, ctx.model, ctx.step
        epochs = warm_epochs(cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        lr = float(ctx.lr if ctx.lr is not None else cfg.lr[-1]) * warm_lr_scale(cfg)
        optimizer = torch.optim.SGD([{"params": trainable, "weight_decay": cfg.weight_decay}], lr=lr, momentum=0.9,
                                    nesterov=True)
        iters = max(1, epochs * len(ctx.train_loader))
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=iters, power=cfg.lr_power)
        scaler = torch.amp.GradScaler(torch.device(ctx.device).type, enabled=ctx.amp_dtype is torch.float16)
        named = self._phase_tensors(model)
        start = self._resume(ctx, full, named, optimizer, scheduler, scaler)
        what = "NeST pre-tuning" if full else "direct pre-tuning of the new classifier"
        if epochs == 0:
            log.info("step %d: %s: 0 epochs (--warm_epochs 0), the prior alone", step, what)
            return
        log.info("step %d: %s, %d epochs of %d iterations, lr %g, %d trainable values, everything else frozen "
                 "(BatchNorm statistics %s)", step, what, epochs, len(ctx.train_loader), lr,
                 sum(p.numel() for p in trainable), "update" if self.options.nest_bn == "update" else "frozen")
        unbiased = bool(cfg.nest or cfg.unce_in_warm)
        t_phase = time.perf_counter()
        for epoch in range(start, epochs):
            model.train()
            if self.options.nest_bn == "frozen":
                for m in model.norm_layers():
                    m.eval()
            total = torch.zeros((), device=ctx.device)
            n_iter = len(ctx.train_loader)
            bar = logger.progress_bar(range(n_iter), enabled=not cfg.no_progress, desc=f"step {step} {what} "
                                      f"epoch {epoch + 1}/{epochs}", total=n_iter)
            t0 = time.perf_counter()
            for it, (images, labels) in enumerate(self._batches(ctx, PHASE_EPOCH_BASE + epoch)):
                with ctx.autocast():
                    logits, _ = model(images)
                    logits_old = None
                    if self.options.unkd_in_warm:
                        with torch.no_grad():
                            logits_old, _ = ctx.model_old(images)
                    loss = warm_loss(logits, labels, ctx.n_old, unbiased=unbiased, logits_old=logits_old,
                                     kd_factor=float(self.options.unkd_in_warm_factor))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if get_world_size() > 1:  # the frozen model is not wrapped in DDP: average NeST's gradients
                    for p in trainable:
                        if p.grad is not None:
                            all_reduce_sum(p.grad).div_(get_world_size())
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += loss.detach()
                if bar is not None:
                    bar.update(1)
                if (it + 1) % cfg.print_interval == 0 or it + 1 == n_iter:
                    elapsed = time.perf_counter() - t0
                    log.info("step %d %s epoch %d/%d iter %d/%d loss %.4f (%s elapsed, epoch ETA %s)", step, what,
                             epoch + 1, epochs, it + 1, n_iter, float(loss.detach()), duration(elapsed),
                             eta(elapsed, it + 1, n_iter), extra={"file_only": bar is not None and it + 1 < n_iter})
            if bar is not None:
                bar.close()
            mean = float(all_reduce_sum(total) / (n_iter * get_world_size()))
            if not math.isfinite(mean) or not all(bool(torch.isfinite(p).all()) for p in trainable):
                raise UserError(f"step {step}: {what} diverged in epoch {epoch + 1}/{epochs} (loss {mean:.4g}); "
                                "lower --warm_lr_scale or --lr; rerun to restart the pre-tuning from its last epoch")
            log.info("step %d %s epoch %d/%d done (mean loss %.4f; phase ETA %s)", step, what, epoch + 1, epochs,
                     mean, eta(time.perf_counter() - t_phase, epoch + 1 - start, epochs - start))
            self._save(ctx, full, epoch + 1, named, optimizer, scheduler, scaler)

    # ---- the phase's own in-step checkpoint -----------------------------------------------------------------------
    @staticmethod
    def _phase_tensors(model) -> dict[str, Tensor]:
        """What the pre-tuning changes: the trainable tensors and the buffers (BatchNorm statistics drift)."""
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        named.update(dict(model.named_buffers()))
        return named

    def _save(self, ctx, full, epoch, named, optimizer, scheduler, scaler) -> None:
        path = phase_path(ctx)
        if path and is_main_process():
            save_checkpoint(path, phase="nest", epoch=epoch, key=_phase_key(self.cfg, full),
                            state={n: t.detach().cpu().clone() for n, t in named.items()},
                            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                            scaler_state=scaler.state_dict(), rng_state={"torch": torch.get_rng_state()})
        barrier()

    def _resume(self, ctx, full, named, optimizer, scheduler, scaler) -> int:
        path = phase_path(ctx)
        if not path or not os.path.isfile(path):
            return 0
        if ctx.no_auto_resume:
            log.info("step %d: --no_auto_resume: NeST's pre-tuning starts over (%s is replaced)", ctx.step, path)
            return 0
        restart = "delete it or pass --no_auto_resume to start the pre-tuning over"
        ckpt = safe_load(path, "NeST pre-tuning checkpoint", hint=f"; {restart}")
        key = _phase_key(self.cfg, full)
        if not isinstance(ckpt, dict) or ckpt.get("phase") != "nest" or not isinstance(ckpt.get("state"), dict):
            raise UserError(f"{path} is not a NeST pre-tuning checkpoint; {restart}")
        if ckpt.get("key") != key:
            diff = sorted(k for k in key if (ckpt.get("key") or {}).get(k) != key[k])
            raise UserError(f"{path} was written with other pre-tuning settings ({', '.join(diff)}); {restart}")
        state = ckpt["state"]
        if set(state) != set(named) or any(state[n].shape != t.shape for n, t in named.items()):
            raise UserError(f"{path} does not fit this step's model; {restart}")
        with torch.no_grad():
            for n, t in named.items():
                t.copy_(state[n])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        if ckpt.get("scaler_state"):
            scaler.load_state_dict(ckpt["scaler_state"])
        torch.set_rng_state(ckpt["rng_state"]["torch"])
        log.info("step %d: resuming NeST's pre-tuning from %s after epoch %d/%d", ctx.step, path, ckpt["epoch"],
                 warm_epochs(self.cfg))
        return int(ckpt["epoch"])
