"""utils/loss.py against independent per-pixel computations (explicit loops, plain math)."""
import math

import pytest
import torch

from utils import loss as L

B, C, H, W = 2, 5, 4, 4
N_OLD = 3


def _data(seed=0, c=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c, H, W, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (B, H, W), generator=g)
    y[0, 0, 0] = y[1, 2, 3] = 255
    return x, y


def _pixels():
    for b in range(B):
        for i in range(H):
            for j in range(W):
                yield b, i, j


def _softmax(v):
    e = [math.exp(t) for t in v]
    s = sum(e)
    return [t / s for t in e]


def test_cross_entropy_ignores_255_and_counts_it_in_the_mean():
    x, y = _data()
    out = L.cross_entropy(x, y)
    for b, i, j in _pixels():
        lab = int(y[b, i, j])
        p = _softmax(x[b, :, i, j].tolist())
        expected = 0.0 if lab == 255 else -math.log(p[lab])
        assert out[b, i, j].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
def test_unbiased_cross_entropy_matches_explicit_formula(use_mask):
    x, y = _data(1)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 0, :] = True
    out = L.unbiased_cross_entropy(x, y, N_OLD, mask=mask if use_mask else None)
    for b, i, j in _pixels():
        lab = int(y[b, i, j])
        p = _softmax(x[b, :, i, j].tolist())
        if lab == 255 or (use_mask and mask[b, i, j]):
            expected = 0.0
        elif lab < N_OLD:  # old classes count as background: log of the summed probability
            expected = -math.log(sum(p[:N_OLD]))
        else:
            expected = -math.log(p[lab])
        assert out[b, i, j].item() == pytest.approx(expected, rel=1e-5)


def test_unbiased_cross_entropy_with_only_background_old_is_ce():
    x, y = _data(2)
    torch.testing.assert_close(L.unbiased_cross_entropy(x, y, 1), L.cross_entropy(x, y))


def test_bce_with_ignore():
    x, y = _data(3)
    out = L.bce_with_ignore(x, y)
    for b, i, j in _pixels():
        lab = int(y[b, i, j])
        if lab == 255:
            assert out[b, i, j].item() == 0
            continue
        expected = 0.0
        for c in range(C):
            s = 1 / (1 + math.exp(-x[b, c, i, j].item()))
            expected -= math.log(s) if c == lab else math.log(1 - s)
        assert out[b, i, j].item() == pytest.approx(expected, rel=1e-5)


def _bce(logit, target):
    s = 1 / (1 + math.exp(-logit))
    return -(target * math.log(s) + (1 - target) * math.log(1 - s))


def test_icarl_combined_distillation():
    x, _ = _data(4)
    x_old = torch.randn(B, N_OLD, H, W, dtype=torch.float64)
    total = 0.0
    for b, i, j in _pixels():
        for c in range(N_OLD):
            total += _bce(x[b, c, i, j].item(), 1 / (1 + math.exp(-x_old[b, c, i, j].item())))
    expected = total / (B * H * W * N_OLD)
    assert L.icarl_distillation(x, x_old).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bkg", [False, True])
def test_icarl_disjoint(bkg):
    x, y = _data(5)
    x_old = torch.randn(B, N_OLD, H, W, dtype=torch.float64)
    out = L.icarl_disjoint(x, y, x_old, bkg=bkg)
    for b, i, j in _pixels():
        lab = int(y[b, i, j])
        expected = 0.0
        for c in range(C):
            target = 1.0 if c == lab else 0.0
            if c < N_OLD and not (bkg and c == 0):
                target = 1 / (1 + math.exp(-x_old[b, c, i, j].item()))
            expected += _bce(x[b, c, i, j].item(), target)
        assert out[b, i, j].item() == pytest.approx(expected, rel=1e-5)


def test_focal_losses():
    x, y = _data(6)
    ce = L.cross_entropy(x, y)
    focal = L.focal_loss(x, y, alpha=0.5, gamma=2)
    new = L.focal_loss_new(x, y, N_OLD, alpha=0.5, gamma=2)
    for b, i, j in _pixels():
        e = ce[b, i, j].item()
        f = 0.5 * (1 - math.exp(-e)) ** 2 * e
        assert focal[b, i, j].item() == pytest.approx(f, rel=1e-6, abs=1e-12)
        assert new[b, i, j].item() == pytest.approx(f if y[b, i, j] >= N_OLD else e, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_knowledge_distillation_old_classes_mean(alpha):
    x, _ = _data(7)
    x_old = torch.randn(B, N_OLD, H, W, dtype=torch.float64)
    out = L.knowledge_distillation(x, x_old, alpha)
    for b, i, j in _pixels():
        q = _softmax([alpha * v for v in x_old[b, :, i, j].tolist()])
        p = _softmax(x[b, :N_OLD, i, j].tolist())  # renormalised over old classes only
        expected = -sum(qc * math.log(pc) for qc, pc in zip(q, p)) / N_OLD
        assert out[b, i, j].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_unbiased_knowledge_distillation(alpha):
    x, _ = _data(8)
    x_old = torch.randn(B, N_OLD, H, W, dtype=torch.float64)
    out = L.unbiased_knowledge_distillation(x, x_old, alpha)
    for b, i, j in _pixels():
        q = _softmax([alpha * v for v in x_old[b, :, i, j].tolist()])
        p = _softmax(x[b, :, i, j].tolist())
        p_bg = p[0] + sum(p[N_OLD:])  # background absorbs the new classes
        ell = q[0] * math.log(p_bg) + sum(q[c] * math.log(p[c]) for c in range(1, N_OLD))
        assert out[b, i, j].item() == pytest.approx(-ell / N_OLD, rel=1e-6)


def test_kd_and_unkd_agree_without_new_class_mass():
    # if new-class logits are -inf-like, UNKD reduces to KD computed with a full softmax over old classes
    x, _ = _data(9)
    x[:, N_OLD:] = -1e4
    x_old = torch.randn(B, N_OLD, H, W, dtype=torch.float64)
    torch.testing.assert_close(L.unbiased_knowledge_distillation(x, x_old), L.knowledge_distillation(x, x_old))


def test_feature_distillation_is_mse():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert L.feature_distillation(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-5)


def test_entropies():
    p = torch.softmax(torch.randn(2, 4, 3, 3, dtype=torch.float64), dim=1)
    h = -(p * torch.log(p + 1e-8)).sum(dim=1)
    torch.testing.assert_close(L.normalized_entropy(p), h / math.log(4))
    torch.testing.assert_close(L.plop_entropy(p), h / 4 / math.log(4))  # mean over classes: the PLOP quirk
    uniform = torch.full((1, 4, 1, 1), 0.25)
    assert L.normalized_entropy(uniform).item() == pytest.approx(1.0, abs=1e-6)
    assert L.plop_entropy(uniform).item() == pytest.approx(0.25, abs=1e-6)


def test_soft_cross_entropy_sign_fixed_and_masks():
    from utils.loss import soft_cross_entropy

    torch.manual_seed(3)
    logits, logits_old = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 5, (2, 4, 4))
    certain = torch.rand(2, 4, 4) > 0.5
    loss = soft_cross_entropy(logits, labels, logits_old, certain, factor=0.5)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if certain[b, i, j]:
                    expected = -torch.log_softmax(logits[b, :, i, j], 0)[labels[b, i, j]]
                else:
                    p_new = torch.softmax(logits[b, :3, i, j], 0)
                    expected = 0.5 * -(p_new * torch.log_softmax(logits_old[b, :, i, j], 0)).sum()
                    assert expected > 0  # a cross-entropy: the reference's sign made this negative
                assert torch.allclose(loss[b, i, j], expected, atol=1e-6)
