"""EWC / PI / RW (methods/regularizers.py) on a toy model with hand-computed gradients."""
import copy

import pytest
import torch

from methods.regularizers import Regularizer, normalize_fn


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = torch.nn.Parameter(torch.tensor([0.5, 0.0, 3.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.tensor([1.0]))  # trainable but never gets a gradient


class Wrapped(torch.nn.Module):  # stands for DistributedDataParallel: parameters under "module."
    def __init__(self, m):
        super().__init__()
        self.module = m


X = torch.tensor([3.0, 1.0])


def _backward(model, scale=1.0):
    model.zero_grad()
    (scale * ((model.a * X).sum() + (model.b ** 2).sum())).backward()  # grads: X and 2b


def _reg(kind, model, model_old=None, previous=None, **kw):
    return Regularizer(kind=kind, model=model, model_old=model_old, previous=previous, **kw)


def test_ewc_fisher_ema_skips_frozen_and_gradless_params():
    m = Toy()
    reg = _reg("ewc", m, alpha=0.9)
    assert set(reg.fisher) == {"a", "b", "unused"}
    _backward(m)
    assert reg.after_backward(m) == {}  # step 0: statistics only
    torch.testing.assert_close(reg.fisher["a"], 0.9 * X ** 2 + 0.1)
    torch.testing.assert_close(reg.fisher["b"], 0.9 * (2 * m.b.detach()) ** 2 + 0.1)
    torch.testing.assert_close(reg.fisher["unused"], torch.ones(1))


def test_grad_scale_and_ddp_prefix():
    m1, m2 = Toy(), Toy()
    r1, r2 = _reg("ewc", m1), _reg("ewc", Wrapped(m2))
    _backward(m1)
    _backward(m2, scale=8.0)
    r1.after_backward(m1)
    r2.after_backward(Wrapped(m2), grad_scale=8.0)
    for n in r1.fisher:
        torch.testing.assert_close(r1.fisher[n], r2.fisher[n])


def test_ewc_penalty_at_next_step_uses_normalised_old_fisher():
    m = Toy()
    reg0 = _reg("ewc", m)
    _backward(m)
    reg0.after_backward(m)
    state = reg0.state_dict()
    old = copy.deepcopy(m).requires_grad_(False)
    new = Toy()
    with torch.no_grad():
        new.a += torch.tensor([0.5, -1.0])
        new.b -= 2.0
    reg1 = _reg("ewc", new, model_old=old, previous=state, importance=100.0)
    _backward(new)
    out = reg1.after_backward(new)
    expected = 0.0
    for n in ("a", "b", "unused"):
        f = state["fisher"][n]
        norm = (f - f.min()) / (f.max() - f.min() + 1e-8)
        expected += (norm * (getattr(new, n) - getattr(old, n)) ** 2).sum().item()
    assert out["loss_reg"].item() == pytest.approx(100.0 * expected, rel=1e-6)
    out["loss_reg"].backward()  # differentiable w.r.t. the new parameters
    assert _reg("ewc", new, model_old=old, previous=state, normalize=False).old_importance["a"].equal(
        state["fisher"]["a"])


def test_pi_path_integral_and_importance():
    m = Toy()
    reg = _reg("pi", m)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    _backward(m)
    reg.after_backward(m)  # theta_prev == theta: no contribution
    g1 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert all(torch.count_nonzero(d) == 0 for d in reg.delta.values())
    with torch.no_grad():  # an SGD step
        for n, g in g1.items():
            getattr(m, n).sub_(0.1 * g)
    _backward(m)
    g2 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    reg.after_backward(m)
    for n in ("a", "b"):
        delta = g2[n] * (start[n] - getattr(m, n).detach())
        torch.testing.assert_close(reg.delta[n], delta)
        score = (delta / ((getattr(m, n).detach() - start[n]) ** 2 + 1e-20)).clamp(min=0)
        torch.testing.assert_close(reg.state_dict()["score"][n], score)


def test_rw_score_every_reg_iterations():
    """behaviour notes 11.3: with --reg_iterations 2 the window opens at call 0 (theta_tmp := theta, no score) and the
    score moves at call 2 (count % 2 == 0, count > 0) with the Fisher of before that call's update; no previous
    score: the stored score is max(0, score), not halved."""
    m = Toy()
    reg = _reg("rw", m, iterations=2, alpha=0.5)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    for shift in (0.0, 0.1):
        with torch.no_grad():
            m.a.sub_(shift)
            m.b.add_(2 * shift)
        _backward(m)
        reg.after_backward(m)
        assert all(torch.count_nonzero(s) == 0 for s in reg.score.values())
    fisher_before = {n: f.clone() for n, f in reg.fisher.items()}
    with torch.no_grad():
        m.a.sub_(0.1)
        m.b.add_(0.2)
    _backward(m)
    reg.after_backward(m)  # call 2: score update
    for n in ("a", "b"):
        g = getattr(m, n).grad
        step = start[n] - getattr(m, n).detach()
        expected = g * step / (0.5 * fisher_before[n] * step ** 2 + 1e-8)
        torch.testing.assert_close(reg.score[n], expected)
        torch.testing.assert_close(reg.state_dict()["score"][n], expected.clamp(min=0))


@pytest.mark.parametrize("kind", ["ewc", "pi", "rw"])
def test_state_dict_round_trip_and_next_step_penalty(kind):
    m = Toy()
    reg = _reg(kind, m, iterations=1)
    for _ in range(2):
        _backward(m)
        reg.after_backward(m)
        with torch.no_grad():
            m.a.sub_(0.1 * m.a.grad)
            m.b.sub_(0.1 * m.b.grad)
    state = reg.state_dict()
    resumed = _reg(kind, m, iterations=1)
    resumed.load_state_dict(state)
    again = resumed.state_dict()
    assert again.keys() == state.keys()
    for key in ("fisher", "score"):
        for n in state.get(key, {}):
            torch.testing.assert_close(again[key][n], state[key][n])
    new = Toy()
    nxt = _reg(kind, new, model_old=copy.deepcopy(m).requires_grad_(False), previous=state, importance=2.0)
    _backward(new)
    out = nxt.after_backward(new)
    assert out["loss_reg"].item() > 0


def test_normalize_fn():
    torch.testing.assert_close(normalize_fn(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]),
                               atol=1e-6, rtol=0)
