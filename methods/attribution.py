"""Channel attribution for AWT: Integrated Gradients of the old model's background logit with respect to the
input of the step-0 classifier, in closed form (exact) or with Captum (the reference), aggregated over images.

The policy around it (flags, masks, files, classifier initialisation) is in ``methods/awt.py``; docs/awt.md
explains why the closed form is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.transform import images_to_device, labels_to_device
from methods.base import TransferSource
from modules.heads import final_layer
from segmentation_module import IncrementalSegmentationModule
from utils.errors import UserError
from utils.progress import Meter


# The reference flags choose one of these (attribute.py 3.2); the default is the first.
AGGREGATIONS = ("max_after_mean", "mean_after_max", "mean_after_avg", "avg_after_mean")

def unwrap(model):
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Target:
    """What is attributed: the input of ``layer`` (a 1x1 conv ending a classifier), for the logit ``index`` of the
    model's output (``row`` of that layer); the default is the background row of ``cls[0]``."""

    layer: nn.Module
    row: int
    index: int
    name: str  # for messages: "cls[0]" for the default


def resolve_target(model, source: TransferSource | None = None) -> Target:
    """The attribution target of ``model`` (unwrapped) for a ``TransferSource`` (None: background of cls[0])."""
    model = unwrap(model)
    cls = getattr(model, "cls", None)
    if not isinstance(cls, nn.ModuleList) or len(cls) == 0:
        raise UserError("AWT needs a model with a ModuleList `cls` of classifiers")
    if source is None:
        source = TransferSource(final_layer(cls[0]), 0)
    for i, classifier in enumerate(cls):
        if final_layer(classifier) is source.layer:
            offset = sum(int(final_layer(c).weight.shape[0]) for c in list(cls)[:i])
            name = f"cls[{i}]" if classifier is source.layer else f"the last layer of cls[{i}]"
            return Target(source.layer, int(source.row), offset + int(source.row), name)
    raise UserError("AWT transfer source is not the last layer of one of the model's classifiers")


def check_exact_supported(model, cfg=None, target: Target | None = None) -> None:
    """Refuse (UserError) configurations where the attributed logit sum is not affine in the input of the target
    layer (default: the background row of ``cls[0]``).

    The exact path relies on: the layer a plain ``nn.Conv2d`` 1x1 (stride 1, no padding/dilation/groups) with bias
    whose forward is the standard one and carries no hooks, ending one of the classifiers; the model's forward the
    standard ``IncrementalSegmentationModule.forward`` (classifiers on ``pre_logits``, bilinear upsampling,
    concatenation); no cosine classifier and a single background mode. A numerical check follows on the first input
    size."""
    hint = "use --attribution captum for this configuration"
    if cfg is not None:
        if getattr(cfg, "cosine", False):
            raise UserError(f"--attribution exact does not support --cosine (the classifier is not affine); {hint}")
        if int(getattr(cfg, "nb_background_modes", 1) or 1) > 1:
            raise UserError("--attribution exact does not support a multi-modal background "
                            f"(--nb_background_modes > 1 fuses several logits non-linearly); {hint}")
    model = unwrap(model)
    cls = getattr(model, "cls", None)
    if not isinstance(cls, nn.ModuleList) or len(cls) == 0:
        raise UserError(f"--attribution exact needs a model with a ModuleList `cls` of classifiers; {hint}")
    target = target or resolve_target(model)
    c0, where = target.layer, target.name
    if type(c0) is not nn.Conv2d or "forward" in vars(c0) or type(c0).forward is not nn.Conv2d.forward:
        raise UserError(f"--attribution exact needs {where} to be a plain nn.Conv2d, got {type(c0).__name__}; "
                        f"{hint}")
    if (tuple(c0.kernel_size) != (1, 1) or tuple(c0.stride) != (1, 1) or tuple(c0.dilation) != (1, 1)
            or c0.groups != 1 or (isinstance(c0.padding, str) and c0.padding != "valid")
            or (not isinstance(c0.padding, str) and tuple(c0.padding) != (0, 0)) or c0.bias is None):
        raise UserError(f"--attribution exact needs {where} to be a 1x1 convolution with bias (stride 1, no "
                        f"padding, dilation or groups), got {c0}; {hint}")
    if c0._forward_hooks or c0._forward_pre_hooks:
        raise UserError(f"--attribution exact: {where} carries forward hooks that may change its output; {hint}")
    head_channels = getattr(model, "head_channels", c0.in_channels)
    if c0.in_channels != head_channels:
        raise UserError(f"--attribution exact: {where} reads {c0.in_channels} channels but the head produces "
                        f"{head_channels}; {hint}")
    if not isinstance(model, IncrementalSegmentationModule) \
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
    """Closed-form Integrated Gradients of ``sum_pixels(logits[:, k])`` w.r.t. the input ``z`` of the target layer
    (default: ``k = 0``, the background row of ``cls[0]``, whose input is ``pre_logits``).

    ``F(z) = sum_{c,i,j} W_k[c] a_ij z[c,i,j] + const``, so ``IG(z; z') = (z - z') * W_k[c] * a_ij`` exactly
    (docs/awt.md). One forward per image batch; the baseline ``z'`` (zero image) and ``a`` once per input size."""

    def __init__(self, model, cfg=None, *, verify: bool = True, source: TransferSource | None = None):
        self._target = resolve_target(model, source)
        check_exact_supported(model, cfg, self._target)
        self.model = unwrap(model)
        self.verify = verify
        self._cache: dict = {}

    @property
    def target(self) -> Target:
        if getattr(self, "_target", None) is None:  # an instance built without __init__: the default target
            self._target = resolve_target(self.model)
        return self._target

    def _forward(self, images: Tensor, perturb=None) -> tuple[Tensor, Tensor]:
        """(logits, input of the target layer), the input captured on its way in (after ``perturb``, if any)."""
        seen = {}

        def capture(_module, inp):
            z = inp[0] if perturb is None else perturb(inp[0])
            seen["z"] = z
            return (z,)

        hook = self.target.layer.register_forward_pre_hook(capture)
        try:
            logits, _ = self.model(images)
        finally:
            hook.remove()
        return logits, seen["z"]

    def _weights(self) -> Tensor:
        return self.target.layer.weight[self.target.row, :, 0, 0].detach()

    @torch.no_grad()
    def _baseline(self, shape, device, dtype):
        """``(z', a)`` for an input size: one forward of a batch of 3 zero images; images 1 and 2 get a
        perturbation of the classifier input (random, and aligned with the background weights so that no
        cancellation hides a non-linearity) to check numerically that F is affine there."""
        key = (tuple(shape), str(device), dtype)
        if key not in self._cache:
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = self._weights()
            deltas = {}

            def perturb(z):
                rand = torch.randn(z.shape[1:], generator=gen, dtype=torch.float64)
                aligned = rand.abs() * torch.sign(w.double().cpu())[:, None, None]
                deltas["d"] = torch.stack([torch.zeros_like(rand), rand, aligned]).to(z.device)
                return z + deltas["d"].to(z.dtype)

            zeros = torch.zeros(3 if self.verify else 1, 3, *shape, device=device, dtype=dtype)
            logits, z = self._forward(zeros, perturb if self.verify else None)
            z0 = z[:1]  # image 0 is not perturbed: the input of the zero image
            a = upsample_column_sums(z0.shape[-2:], logits.shape[-2:], device=device, dtype=z0.dtype)
            if self.verify:
                self._verify_affine(logits[:, self.target.index], deltas["d"], w, a, self.target.name)
            self._cache[key] = (z0, a)
        return self._cache[key]

    @staticmethod
    def _verify_affine(logit, deltas, w, a, where: str = "cls[0]") -> None:
        grad = w.double()[:, None, None] * a.double()  # dF/dz if F is affine
        sums = logit.double().sum(dim=(1, 2))
        for i in (1, 2):
            actual = float(sums[i] - sums[0])
            predicted = float((deltas[i] * grad).sum())
            scale = float((deltas[i].abs() * grad.abs()).sum()) + 1e-12
            if abs(actual - predicted) > 1e-3 * abs(predicted) + 1e-5 * scale:
                raise UserError("--attribution exact: the attributed logit sum is not affine in the input of "
                                f"{where} for this model (perturbation check {actual:.6g} vs {predicted:.6g}); "
                                "use --attribution captum")

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Per-image layer attributions ``(B, C, h, w)`` (same values as Captum's LayerIntegratedGradients)."""
        _, z = self._forward(images)
        z0, a = self._baseline(images.shape[-2:], images.device, images.dtype)
        w = self._weights().to(z.dtype)
        return (z - z0) * w[None, :, None, None] * a[None, None]


class CaptumAttributor:
    """The reference computation: Captum ``LayerIntegratedGradients`` on the target layer's input (``cls[0]``'s,
    logit 0, by default), zero image baseline, ``n_steps`` Gauss-Legendre points, one image at a time, parameters
    frozen."""

    def __init__(self, model, *, n_steps: int = 50, internal_batch_size: int | None = 8,
                 source: TransferSource | None = None):
        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError as exc:  # pragma: no cover - captum is a requirement
            raise UserError("--attribution captum needs the captum package (pip install captum)") from exc
        self.model = unwrap(model)
        self.n_steps = int(n_steps)
        self.internal_batch_size = internal_batch_size
        model_ref = self.model

        def summed_logits(x):
            return model_ref(x)[0].sum(dim=(2, 3))

        self.target = resolve_target(self.model, source)
        self.lig = LayerIntegratedGradients(summed_logits, self.target.layer)

    def __call__(self, images: Tensor) -> Tensor:
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        outs = []
        try:
            with torch.enable_grad():
                for i in range(images.shape[0]):
                    att = self.lig.attribute(images[i:i + 1], target=self.target.index, n_steps=self.n_steps,
                                             internal_batch_size=self.internal_batch_size,
                                             attribute_to_layer_input=True)
                    outs.append((att[0] if isinstance(att, (tuple, list)) else att).detach())
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return torch.cat(outs, 0)


class SimilarityAttributor:
    """NeST's similarity as a channel score, no gradient (docs/nest.md, combination c): at every position of the
    target layer's input ``z``, ``1[z_c * w_c > 0] * p`` where ``w`` is the transferred row and ``p`` the softmax
    probability of its logit among all the model's logits. With ``--mean_after_avg`` and ``--mask_att`` the union
    score of a channel is the mean, over the new classes' pixels of each image and then over images, of NeST's
    ``M[c, 0]`` indicator: the background row's importance NeST would start from."""

    def __init__(self, model, *, source: TransferSource | None = None):
        self.model = unwrap(model)
        self.target = resolve_target(self.model, source)
        if not any(c is self.target.layer for c in self.model.cls):
            raise UserError("--attribution similarity needs plain 1x1 classifiers on the head's output (a softmax "
                            f"over the classes); {self.target.name} is part of a larger head: use exact")

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        seen = {}
        hook = self.target.layer.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("z", inp[0]))
        try:
            _, extras = self.model(images, ret_intermediate=True)
        finally:
            hook.remove()
        z = seen["z"].float()
        probs = extras["sem_logits_small"].float().softmax(dim=1)[:, self.target.index]
        w = self.target.layer.weight[self.target.row, :, 0, 0].float()
        return (z * w[None, :, None, None] > 0).float() * probs[:, None]


ATTRIBUTION_METHODS = ("exact", "captum", "similarity")


def build_attributor(model, cfg=None, *, method: str = "exact", n_steps: int = 50, internal_batch_size: int = 8,
                     source: TransferSource | None = None):
    if method == "exact":
        return ExactAttributor(model, cfg, source=source)
    if method == "captum":
        return CaptumAttributor(model, n_steps=n_steps, internal_batch_size=internal_batch_size, source=source)
    if method == "similarity":
        return SimilarityAttributor(model, source=source)
    raise UserError(f"unknown --attribution {method!r}; choose one of {', '.join(ATTRIBUTION_METHODS)}")


@dataclass
class AttributionResult:
    scores: Tensor  # [K, C] float32 (K = 1 for the union of the new classes, N_new per class)
    n_used: Tensor  # [K] images that entered each group's aggregate
    n_skipped: Tensor  # [K] images skipped because the group's downsampled mask was empty
    n_images: int  # images drawn from the dataset


class ScoreAccumulator:
    """Streaming aggregation of masked per-image attributions for K groups (union: K = 1; per class: K = N_new).

    Memory is O(K * C * h * w) whatever the number of images: the two "mean first" variants keep the running sum
    of masked maps, the two "per-image reduction first" variants keep running sums of per-image reductions.

    ``cap``: the reference's image cap (behaviour notes 11.5). Images are offered in order; a group stops after the
    first image it uses whose position is ``cap - 1`` or later, so it uses the images it can among the first ``cap``
    positions and, when the last of those was skipped, up to its next usable one."""

    def __init__(self, groups: int, aggregation: str = "max_after_mean", cap: int | None = None):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self.k = int(groups)
        self.aggregation = aggregation
        self.cap = cap
        self.sums: Tensor | None = None  # (K, C, h, w) or (K, C), float64
        self.used = torch.zeros(self.k, dtype=torch.long)
        self.skipped = torch.zeros(self.k, dtype=torch.long)
        self.stopped = torch.zeros(self.k, dtype=torch.bool)
        self.offered = 0  # images offered so far (positions 0 .. offered - 1)

    @property
    def done(self) -> bool:
        return bool(self.stopped.all())

    def _included(self, valid: Tensor) -> Tensor:
        """(B, K) bool: which offered images each group still takes (and stops the groups that reach the cap)."""
        b = valid.shape[0]
        rows = torch.arange(b)[:, None]
        included = ~self.stopped[None, :].expand(b, -1)
        if self.cap is not None:
            last = valid & (torch.arange(self.offered, self.offered + b) >= self.cap - 1)[:, None]  # (B, K)
            first = torch.where(last.any(0), last.float().argmax(0), torch.full((self.k,), b))
            included = included & (rows <= first[None, :])
            self.stopped |= last.any(0)
        self.offered += b
        return included

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
        valid = (masks.flatten(2).amax(2) > 0).cpu()  # (B, K)
        included = self._included(valid)
        for k in range(self.k):
            sel = (valid[:, k] & included[:, k]).to(attributions.device)
            n = int(sel.sum())
            self.used[k] += n
            self.skipped[k] += int(included[:, k].sum()) - n
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
    ``groups`` None = the whole image (no --mask_att). ``labels`` (B, C - 1) are image labels of classes 1..C-1 (a
    weak step): group k = the whole image when it holds a class of ``groups[k]``, else nothing."""
    b = labels.shape[0]
    if groups is None:
        return torch.ones(b, 1, *size, device=labels.device)
    if labels.dim() == 2:
        present = torch.stack([labels[:, [c - 1 for c in g]].amax(1) > 0 for g in groups], 1).float()
        return present[:, :, None, None].expand(-1, -1, *size).contiguous()
    full = torch.stack([torch.isin(labels, torch.tensor(g, device=labels.device)) for g in groups], 1).float()
    return F.interpolate(full, size=tuple(size), mode="nearest")


def channel_importance(model_old, batches: Iterable, new_classes: Sequence[int], *, aggregation: str = "max_after_mean",
                       mask_att: bool = True, per_class: bool = False, accumulate_classes: bool = False,
                       method: str = "exact", n_steps: int = 50, internal_batch_size: int = 8, cfg=None,
                       device=None, total_images: int | None = None, source: TransferSource | None = None,
                       max_images: int | None = None, empty_advice: str | None = None) -> AttributionResult:
    """Signed channel scores of the old model's background logit for the step's new classes.

    ``batches`` yields ``(images (B,3,H,W), labels (B,H,W))`` with labels in the remapped index space;
    ``new_classes`` are the remapped ids of the step's new classes. Scores are ``[1, C]`` for the union of the new
    classes or ``[N_new, C]`` with ``per_class`` (without ``mask_att`` a per-class split is meaningless: refused).
    Images whose (downsampled) mask is empty are skipped and counted; if a group has no image left -> UserError.
    ``max_images``: the reference's cap (:class:`ScoreAccumulator`); ``batches`` is read only as far as needed.
    ``total_images``: how many images ``batches`` holds, for the progress lines (none without it).
    ``empty_advice``: what to do when a group has no pixel at all (default: about the grid, for pixel labels)."""
    if per_class and not mask_att:
        raise UserError("per-class channel masks need --mask_att (without it every class sees the whole image)")
    new_classes = [int(c) for c in new_classes]
    if not new_classes:
        raise UserError("the step has no new classes to attribute")
    attributor = build_attributor(model_old, cfg, method=method, n_steps=n_steps,
                                  internal_batch_size=internal_batch_size, source=source)
    groups = None if not mask_att else ([[c] for c in new_classes] if per_class else [new_classes])
    acc = ScoreAccumulator(len(groups) if groups else 1, aggregation, cap=max_images)
    n_images = 0
    meter = Meter("AWT attribution (images)", total_images) if total_images else None
    for images, labels in batches:
        images, labels = images_to_device(images, device), labels_to_device(labels, device)
        attributions = attributor(images.float())
        acc.update(attributions, attribution_masks(labels, attributions.shape[-2:], groups))
        n_images += images.shape[0]
        if meter is not None:
            meter.update(n_images)
        if acc.done:
            break
    if meter is not None:
        meter.finish()
    if n_images == 0:
        raise UserError("no image to attribute: the step's training set is empty")
    scores, used = acc.scores(accumulate_groups=per_class and accumulate_classes)
    skipped = acc.skipped.cumsum(0) if per_class and accumulate_classes else acc.skipped.clone()
    empty = [new_classes[k] if per_class else "new" for k in range(acc.k) if int(used[k]) == 0]
    if empty:
        what = f"class(es) {empty}" if per_class else "the new classes"
        advice = empty_advice or ("use more images (--att_max_images), a larger --crop_size, or the union mask "
                                  "(attribute.py)")
        raise UserError(f"all {n_images} attributed images were skipped for {what}: their pixels cover no cell of "
                        f"the {tuple(attributions.shape[-2:])} attribution grid (nearest downsampling); {advice}")
    return AttributionResult(scores=scores, n_used=used, n_skipped=skipped, n_images=n_images)
