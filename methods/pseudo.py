"""PLOP pseudo-labelling of background pixels with the old model (behaviour.md 2.5).

At steps > 0, pixels labelled below ``n_old`` (background after masking) get the old model's prediction, depending
on ``--pseudo``: ``naive`` (always), ``threshold_<t>`` (max probability >= t), ``confidence`` (always, weighted by
the max probability), ``median`` (max probability >= per-class threshold), ``entropy`` (PLOP: normalised entropy
below a per-class threshold). Per-class thresholds come from one pass of the old model over the training set
(``before_step``). Uncertain background pixels become ``IGNORE_INDEX`` in ``entropy`` mode (and ``threshold``/
``median`` modes, as in the reference).
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import Tensor

from dataset.transform import images_to_device, labels_to_device
from methods.registry import register_term
from methods.base import Batch, LossTerm, StepContext
from utils import loss as L
from utils.flags import CLASS_INCREMENTAL, NOT_IMPLEMENTED, declare, nonnegative_float
from utils.constants import BACKGROUND, IGNORE_INDEX
from utils.errors import UserError
from utils.progress import track

ENTROPY_BINS = 100  # PLOP find_median: histogram bins on [0, 1] for entropy
PROBABILITY_BINS = 20  # PLOP find_median: bins of 0.05 for probabilities
ADAPTIVE_EPS = 1e-6  # PLOP classif_adaptive_factor denominator
MODES = ("naive", "confidence", "median", "entropy", "threshold_<t>")


def parse_mode(mode: str) -> tuple[str, float | None]:
    """``"threshold_0.9"`` -> ``("threshold", 0.9)``, ``"entropy"`` -> ``("entropy", None)``; UserError otherwise."""
    if mode.startswith("threshold_"):
        try:
            return "threshold", float(mode.split("_", 1)[1])
        except ValueError:
            pass
    elif mode in MODES:
        return mode, None
    raise UserError(f"--pseudo {mode!r} is not a pseudo-labelling mode; use one of {', '.join(MODES)}")


def histogram_median(counts, exact: bool = False) -> float:
    """Approximate median of values binned on [0, 1] (interpolated inside the median bin); 0 for an empty histogram.

    ``exact=False`` (default) is PLOP's ``find_median`` walk, reproduced operation for operation
    (:func:`reference_median`): its thresholds, edge cases included, are what the PLOP preset's numbers came from.
    ``exact=True`` (``--pseudo_exact_median``) is the corrected median: the running sum adds the bin counts, and an
    empty median bin gives its lower border.
    """
    counts = [int(c) for c in counts]
    if sum(counts) <= 0:
        return 0.0
    if not exact:
        return float(reference_median(counts))
    nb_bins = len(counts)
    half = sum(counts) / 2
    running = 0.0
    index = 0
    for index, count in enumerate(counts):
        if running <= half <= running + count:
            break
        running += count
    count = counts[index]
    fraction = (half - running) / count if count > 0 else 0.0
    return index / nb_bins + fraction / nb_bins


def reference_median(counts) -> torch.Tensor:
    """PLOP's walk (``train.py: find_median``, behaviour notes 2.5 and 11.4) as float32 torch scalars, like the
    reference: the running sum adds the bin *index* (``lower_border * nb_bins``) instead of the bin count; the bin read
    is ``int(lower_border * nb_bins)``, which float rounding makes ``k - 1`` for some ``k`` (e.g. 29 of 100); a walk
    that never brackets half of the pixels ends on the last bin and divides by its count, so an empty last bin gives
    -inf, +inf or nan (0/0, also when the bracket closes on an empty bin). Returns a float32 scalar tensor."""
    hist = torch.as_tensor(list(counts), dtype=torch.long)
    nb_bins = hist.numel()
    half = hist.sum() / 2
    running_sum = 0.0
    lower_border, bin_index = 0.0, 0
    for k in range(nb_bins):
        lower_border = k / nb_bins
        bin_index = int(lower_border * nb_bins)
        if half >= running_sum and half <= (running_sum + hist[bin_index]):
            break
        running_sum += lower_border * nb_bins
    return (lower_border + ((half - running_sum) / hist[bin_index].sum()) * (1 / nb_bins)).float()


@register_term
class PseudoLabel(LossTerm):
    """Rewrites ``batch.labels`` (and ``pixel_weight``) before the classification loss; returns no loss itself."""

    name = "pseudo"
    order = 10
    needs_old_model = True
    unsupported = (
        ("pseudo_ablation", None, "pseudo-label error correction with the ground truth"),
    )

    @staticmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        declare(parser.add_argument("--pseudo", type=str, default=None,
                            help="pseudo-label background pixels with the old model: naive, confidence, "
                                 "threshold_<t>, median, entropy (PLOP preset: entropy)"),
                requires=CLASS_INCREMENTAL)
        parser.add_argument("--threshold", type=nonnegative_float, default=0.9,
                            help="entropy mode: lower bound of the per-class entropy thresholds (PLOP: 0.001); "
                                 "median mode: upper bound of the per-class probability thresholds")
        parser.add_argument("--step_threshold", type=float, default=None,
                            help="(ignored: the reference adds it after the thresholds are computed, so it has no "
                                 "effect)")
        parser.add_argument("--ce_on_pseudo", action="store_true", default=False,
                            help="with --pseudo entropy: classification criterion on the original labels of the "
                                 "other pixels plus plain CE on the pseudo-labelled pixels")
        parser.add_argument("--pseudo_nb_bins", type=int, default=None,
                            help="histogram bins for the thresholds (default 100 for entropy, 20 for median)")
        parser.add_argument("--classif_adaptive_factor", action="store_true", default=False,
                            help="with --pseudo entropy: weight each image's classification loss by the fraction of "
                                 "its background pixels that were confidently pseudo-labelled")
        parser.add_argument("--classif_adaptive_min_factor", type=float, default=0.0,
                            help="lower clamp of --classif_adaptive_factor")
        parser.add_argument("--pseudo_entropy_fixed", action="store_true", default=False,
                            help="use the proper normalised entropy H(p)/log(C_old) in [0, 1] instead of PLOP's "
                                 "mean-over-classes entropy divided twice by a log (changes what --threshold means)")
        parser.add_argument("--pseudo_exact_median", action="store_true", default=False,
                            help="compute the true histogram median for the thresholds (PLOP's walk adds bin "
                                 "indices instead of counts)")
        parser.add_argument("--pseudo_soft", default=None, choices=["soft_certain", "soft_uncertain"],
                            help="with --pseudo entropy: soft targets from the old model instead of hard labels on "
                                 "all background pixels (soft_certain) or on the uncertain ones (soft_uncertain); "
                                 "the reference's sign error is fixed")
        parser.add_argument("--pseudo_soft_factor", type=float, default=1.0, help="weight of the --pseudo_soft term")
        parser.add_argument("--pseudo_ablation", default=None, choices=["corrected_errors", "removed_errors"],
                            help=NOT_IMPLEMENTED + "correct pseudo-labels with the ground truth")

    @classmethod
    def check(cls, cfg: Any) -> None:
        mode = getattr(cfg, "pseudo", None)
        if mode is not None:
            parse_mode(mode)
        if getattr(cfg, "pseudo_soft", None) and mode != "entropy":
            raise UserError("--pseudo_soft needs --pseudo entropy (as in PLOP); add it or remove --pseudo_soft")
        if getattr(cfg, "ce_on_pseudo", False) and mode != "entropy":
            raise UserError("--ce_on_pseudo needs --pseudo entropy (as in PLOP); add it or remove --ce_on_pseudo")
        bins = getattr(cfg, "pseudo_nb_bins", None)
        if bins is not None and bins < 1:
            raise UserError(f"--pseudo_nb_bins {bins} must be >= 1")

    def __init__(self, *, mode: str, threshold: float, n_old: int, n_classes: int, nb_bins: int | None = None,
                 adaptive_factor: bool = False, adaptive_min_factor: float = 0.0, entropy_fixed: bool = False,
                 exact_median: bool = False):
        self.mode, self.mode_value = parse_mode(mode)
        self.threshold = threshold
        self.n_old = n_old
        self.n_classes = n_classes  # PLOP's nb_current_classes (old + new)
        default_bins = ENTROPY_BINS if self.mode == "entropy" else PROBABILITY_BINS
        self.nb_bins = nb_bins or default_bins
        self.adaptive_factor = adaptive_factor
        self.adaptive_min_factor = adaptive_min_factor
        self.entropy_fixed = entropy_fixed
        self.exact_median = exact_median
        self.thresholds: Tensor | None = None  # (n_old,) per predicted old class, set by before_step
        self._counts: Tensor | None = None  # (background pixels, pseudo-labelled pixels) this epoch, on the device

    @classmethod
    def build(cls, cfg: Any, ctx: StepContext) -> "PseudoLabel | None":
        mode = getattr(cfg, "pseudo", None)
        if mode is None or ctx.model_old is None:
            return None
        return cls(mode=mode, threshold=getattr(cfg, "threshold", 0.9), n_old=ctx.n_old, n_classes=ctx.n_classes,
                   nb_bins=getattr(cfg, "pseudo_nb_bins", None),
                   adaptive_factor=getattr(cfg, "classif_adaptive_factor", False),
                   adaptive_min_factor=getattr(cfg, "classif_adaptive_min_factor", 0.0),
                   entropy_fixed=getattr(cfg, "pseudo_entropy_fixed", False),
                   exact_median=getattr(cfg, "pseudo_exact_median", False))

    # ---- uncertainty -------------------------------------------------------------------------------------------
    def uncertainty(self, probs: Tensor) -> Tensor:
        """Entropy used for thresholding, scaled to [0, 1]-ish bins.  probs (B, C_old, H, W) -> (B, H, W).

        PLOP (default): ``plop_entropy(p) / log(n_classes)`` (mean over classes, then two log divisions).
        ``--pseudo_entropy_fixed``: ``H(p) / log(C_old)``.
        """
        if self.entropy_fixed:
            return L.normalized_entropy(probs)
        return L.plop_entropy(probs) / math.log(self.n_classes)

    def _bin_values(self, probs: Tensor) -> Tensor:
        if self.mode == "entropy":
            return self.uncertainty(probs)
        return probs.max(dim=1).values

    # ---- thresholds (once per step) ----------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        if self.mode not in ("median", "entropy"):
            return
        hist = self.histograms(ctx.model_old, ctx.train_loader, ctx.device, ctx.autocast)
        self.thresholds = self.thresholds_from_histograms(hist).to(ctx.device)

    @torch.no_grad()
    def histograms(self, model_old: torch.nn.Module, loader: Any, device: Any, autocast: Any) -> Tensor:
        """(n_old, nb_bins) counts of background pixels per predicted old class, all-reduced across ranks."""
        hist = torch.zeros(self.n_old * self.nb_bins, dtype=torch.long, device=device)
        was_training = model_old.training
        model_old.eval()
        for images, labels in track(loader, "pseudo-label thresholds: old model over the training set (batches)"):
            images, labels = images_to_device(images, device), labels_to_device(labels, device)
            with autocast():
                logits_old = model_old(images)[0]
            probs = torch.softmax(logits_old.float(), dim=1)
            background = labels == BACKGROUND
            predicted = probs.argmax(dim=1)[background]
            bins = (self._bin_values(probs)[background] * self.nb_bins).long().clamp(0, self.nb_bins - 1)
            hist += torch.bincount(predicted * self.nb_bins + bins, minlength=hist.numel())
        model_old.train(was_training)
        # Fix (reference: per-rank histograms): every rank sees its shard, so sum them.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hist)
        return hist.view(self.n_old, self.nb_bins)

    def thresholds_from_histograms(self, hist: Tensor) -> Tensor:
        """Per-class thresholds: entropy ``max(median, --threshold)``, median mode ``min(median, --threshold)``.

        Python's ``max``/``min`` on float32 scalars as in the reference: a nan median stays nan (no pixel passes the
        comparison with it), -inf falls to the bound, +inf stays (every pixel passes)."""
        bound = max if self.mode == "entropy" else min
        thresholds = []
        for row in hist.tolist():
            median = torch.tensor(histogram_median(row, exact=self.exact_median), dtype=torch.float32)
            thresholds.append(float(bound(median, self.threshold)))
        return torch.tensor(thresholds, dtype=torch.float32)

    # ---- per batch ---------------------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> None:
        # torch.where instead of boolean indexing: a boolean index is a nonzero(), i.e. a host-device
        # synchronisation per iteration on CUDA (tests/test_host_sync.py)
        labels = batch.labels
        background = labels < self.n_old  # old classes were masked to 0; 255 is never below n_old
        probs = torch.softmax(batch.logits_old.float(), dim=1)  # (B, C_old, H, W)
        max_probs, predicted = probs.max(dim=1)
        weight = None
        pseudo_mask = None
        if self.mode in ("naive", "confidence"):
            labels = torch.where(background, predicted, labels)
            if self.mode == "confidence":
                weight = torch.where(background, max_probs, torch.ones_like(max_probs))
        elif self.mode == "threshold":
            candidate = predicted.masked_fill(max_probs < self.mode_value, IGNORE_INDEX)
            labels = torch.where(background, candidate, labels)
        elif self.mode == "median":
            candidate = predicted.masked_fill(max_probs < self._thresholds(probs)[predicted], IGNORE_INDEX)
            labels = torch.where(background, candidate, labels)
        else:  # entropy
            valid = self.uncertainty(probs) < self._thresholds(probs)[predicted]
            pseudo_mask = background & valid
            labels = torch.where(background & ~valid, IGNORE_INDEX, labels)
            labels = torch.where(pseudo_mask, predicted, labels)
            if self.adaptive_factor:
                factor = pseudo_mask.float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + ADAPTIVE_EPS)
                if self.adaptive_min_factor:
                    factor = factor.clamp(min=self.adaptive_min_factor)
                weight = factor[:, None, None]  # (B, 1, 1)
        taken = background & (labels != IGNORE_INDEX) if pseudo_mask is None else pseudo_mask
        counts = torch.stack([background.sum(), taken.sum()])
        self._counts = counts if self._counts is None else self._counts + counts
        batch.original_labels = batch.labels
        batch.labels = labels
        batch.pseudo_mask = pseudo_mask
        if weight is not None:
            batch.pixel_weight = weight if batch.pixel_weight is None else batch.pixel_weight * weight

    def epoch_notes(self) -> list[str]:
        counts, self._counts = self._counts, None
        if counts is None:
            return []
        background, taken = (int(v) for v in counts.tolist())
        if background and not taken:
            return [f"no pseudo-label was accepted in this epoch (--pseudo {self.mode}: 0 of {background} "
                    "background pixels passed the threshold): old classes are learnt from nothing but "
                    "distillation; check --threshold and the old model"]
        return []

    def _thresholds(self, probs: Tensor) -> Tensor:
        if self.thresholds is None:
            raise RuntimeError("pseudo-label thresholds missing: call Criterion.before_step(ctx) before training")
        return self.thresholds.to(probs.device)
