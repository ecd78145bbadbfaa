"""PLOP pseudo-labelling (methods/pseudo.py) on hand-made old-model outputs."""
import math

import pytest
import torch

from methods.base import Batch
from methods.pseudo import PseudoLabel, histogram_median, parse_mode
from utils.errors import UserError

N_OLD, N_CLASSES = 3, 4  # 3 old classes (incl. background), 1 new


def _batch(old_logits_per_pixel, labels):
    """One image, 1 x P pixels; old_logits_per_pixel: P lists of N_OLD logits."""
    x_old = torch.tensor(old_logits_per_pixel, dtype=torch.float32).t().reshape(1, N_OLD, 1, -1)
    y = torch.tensor(labels).view(1, 1, -1)
    logits = torch.zeros(1, N_CLASSES, 1, y.shape[-1])
    return Batch(images=torch.zeros(1, 3, 1, y.shape[-1]), labels=y, logits=logits, extras={}, logits_old=x_old,
                 extras_old={}, n_old=N_OLD, n_new=1)


# pixels: confident class 1 (bg label) | uniform (bg label) | new class 3 | ignore
PIXELS = [[0.0, 12.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]]
LABELS = [0, 0, 3, 255]
UNIFORM_PLOP = (1 / 3) / math.log(N_CLASSES)  # mean over classes of -p log p / log 3, then / log 4
UNIFORM_FIXED = 1.0


def _term(mode, **kw):
    return PseudoLabel(mode=mode, threshold=kw.pop("threshold", 0.9), n_old=N_OLD, n_classes=N_CLASSES, **kw)


def test_histogram_median_exact_and_plop_quirk():
    counts = [2, 0, 6, 2]  # total 10, half 5
    # exact: running sums 0, 2, 2 -> bin 2, fraction (5-2)/6
    assert histogram_median(counts, exact=True) == pytest.approx(2 / 4 + 0.5 / 4)
    # PLOP: the running sum adds the bin index (0, then 1) -> bin 2 reached with running 1, fraction (5-1)/6
    assert histogram_median(counts, exact=False) == pytest.approx(2 / 4 + (4 / 6) / 4)
    assert histogram_median([0, 0, 0]) == 0.0


def test_thresholds_bounds():
    hist = torch.tensor([[0, 0, 10, 0], [10, 0, 0, 0], [0, 0, 0, 0]])
    entropy = _term("entropy", threshold=0.2, nb_bins=4, exact_median=True)
    # medians: 0.5+0.5/4=0.625, 0+0.5/4=0.125, empty -> 0 ; entropy: max(median, threshold)
    torch.testing.assert_close(entropy.thresholds_from_histograms(hist), torch.tensor([0.625, 0.2, 0.2]))
    median = _term("median", threshold=0.2, nb_bins=4, exact_median=True)
    torch.testing.assert_close(median.thresholds_from_histograms(hist), torch.tensor([0.2, 0.125, 0.0]))


@pytest.mark.parametrize("fixed,threshold,uniform_valid", [(False, 0.3, True), (True, 0.3, False),
                                                            (False, 0.2, False), (True, 1.01, True)])
def test_entropy_mode_quirk_and_fixed(fixed, threshold, uniform_valid):
    term = _term("entropy", entropy_fixed=fixed, adaptive_factor=True)
    term.thresholds = torch.full((N_OLD,), threshold)
    batch = _batch(PIXELS, LABELS)
    term.prepare(batch)
    value = UNIFORM_FIXED if fixed else UNIFORM_PLOP
    assert (value < threshold) == uniform_valid
    expected = [1, 0 if uniform_valid else 255, 3, 255]  # uniform pixel: argmax of equal logits is class 0
    assert batch.labels.flatten().tolist() == expected
    assert batch.original_labels.flatten().tolist() == LABELS
    assert batch.pseudo_mask.flatten().tolist() == [True, uniform_valid, False, False]
    factor = (1 + uniform_valid) / (2 + 1e-6)
    assert batch.pixel_weight.flatten().tolist() == pytest.approx([factor])


def test_uncertainty_values():
    probs = torch.full((1, N_OLD, 1, 1), 1 / N_OLD)
    assert _term("entropy").uncertainty(probs).item() == pytest.approx(UNIFORM_PLOP, rel=1e-5)
    assert _term("entropy", entropy_fixed=True).uncertainty(probs).item() == pytest.approx(1.0, rel=1e-5)


def test_naive_threshold_confidence_median_modes():
    p_conf = torch.softmax(torch.tensor([0.0, 12.0, 0.0]), 0).max().item()
    batch = _batch(PIXELS, LABELS)
    _term("naive").prepare(batch)
    assert batch.labels.flatten().tolist() == [1, 0, 3, 255]
    assert batch.pixel_weight is None

    batch = _batch(PIXELS, LABELS)
    _term("threshold_0.5").prepare(batch)
    assert batch.labels.flatten().tolist() == [1, 255, 3, 255]

    batch = _batch(PIXELS, LABELS)
    _term("confidence").prepare(batch)
    assert batch.labels.flatten().tolist() == [1, 0, 3, 255]
    assert batch.pixel_weight.flatten().tolist() == pytest.approx([p_conf, 1 / 3, 1.0, 1.0])

    term = _term("median")
    term.thresholds = torch.tensor([0.2, 0.99999, 0.2])
    batch = _batch(PIXELS, LABELS)
    term.prepare(batch)
    assert batch.labels.flatten().tolist() == [255, 0, 3, 255]  # class-1 pixel below its own threshold


class _FixedOld(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images, ret_intermediate=False):
        return self.logits[: images.shape[0]], {}


@pytest.mark.parametrize("exact", [False, True])
def test_histograms_and_thresholds_from_a_pass_of_the_old_model(exact):
    batch = _batch(PIXELS, LABELS)
    old = _FixedOld(batch.logits_old)
    term = _term("entropy", threshold=0.001, nb_bins=10, exact_median=exact)
    loader = [(batch.images, batch.labels)] * 3
    hist = term.histograms(old, loader, "cpu", lambda: torch.autocast("cpu", enabled=False))
    expected = torch.zeros(N_OLD, 10, dtype=torch.long)
    expected[1, 0] = 3  # confident pixel: class 1, entropy ~0
    expected[0, int(UNIFORM_PLOP * 10)] = 3  # uniform pixel: predicted 0, entropy bin 2
    torch.testing.assert_close(hist, expected)
    th = term.thresholds_from_histograms(hist)
    assert th[2].item() == pytest.approx(0.001)  # no pixel: the --threshold floor
    assert th[0].item() >= 0.2


def test_parse_mode():
    assert parse_mode("threshold_0.7") == ("threshold", 0.7)
    assert parse_mode("entropy") == ("entropy", None)
    for bad in ("threshold_x", "bogus"):
        with pytest.raises(UserError):
            parse_mode(bad)
