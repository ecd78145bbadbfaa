"""Review of the continual-learning methods against behaviour.md section 2 (findings of the methods review)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import Batch
from methods.regularizers import Regularizer


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, ret_intermediate=False):
        return self.conv(x), {}


class _Criterion:
    """CE + an EWC regulariser with a loaded previous Fisher (penalty active)."""

    needs_features = False

    def __init__(self, reg):
        self.reg = reg
        self.terms = [reg]

    def __call__(self, batch: Batch):
        return {"loss_ce": F.cross_entropy(batch.logits, batch.labels)}

    def after_backward(self, model, grad_scale=1.0):
        return self.reg.after_backward(model, grad_scale)


def test_regularizer_works_under_torch_compile():
    """--compile wraps the training model in an OptimizedModule whose parameter names start with ``_orig_mod.``;
    the trainer must hand the plain module to ``after_backward``, else EWC/RW/PI silently update nothing and the
    penalty vanishes."""
    import train

    torch.manual_seed(0)
    model, old = _Net(), _Net()
    for p in old.parameters():
        p.requires_grad_(False)
    fisher = {n: torch.rand_like(p) for n, p in old.named_parameters()}
    reg = Regularizer(kind="ewc", model=model, model_old=old, previous={"type": "ewc", "fisher": fisher},
                      importance=1.0)
    crit = _Criterion(reg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    setup = train.EpochSetup(criterion=crit, optimizer=opt, scheduler=sched,
                             scaler=torch.amp.GradScaler("cpu", enabled=False),
                             precision=train.Precision("cpu", None), n_old=3, n_new=0)
    loader = [(torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))) for _ in range(2)]
    compiled = torch.compile(model, backend="eager")
    means = train.train_one_epoch(compiled, None, loader, setup, step=1, epoch=0, device=torch.device("cpu"))
    assert not torch.equal(reg.fisher["conv.weight"], torch.ones_like(reg.fisher["conv.weight"]))  # Fisher updated
    assert means.get("loss_reg", 0.0) > 0  # and the penalty reached the loss


class _Toy(torch.nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        if extra:  # a parameter of the new step only (stands for the new classifier)
            self.new = torch.nn.Parameter(torch.tensor([0.5]))


def test_fisher_ema_continues_from_the_previous_fisher():
    """behaviour.md 2.7: the Fisher EMA is "initialised to ones for new keys"; keys of the previous step continue
    from the previous step's (raw, not normalised) Fisher."""
    old = _Toy()
    prev_fisher = {"a": torch.tensor([4.0, 0.5])}
    for kind in ("ewc", "rw"):
        previous = {"type": kind, "fisher": {"a": prev_fisher["a"].clone()}, "score": {"a": torch.zeros(2)}}
        model = _Toy(extra=True)
        reg = Regularizer(kind=kind, model=model, model_old=old, previous=previous)
        torch.testing.assert_close(reg.fisher["a"], prev_fisher["a"])
        torch.testing.assert_close(reg.fisher["new"], torch.ones(1))
        model.zero_grad()
        (model.a * torch.tensor([3.0, 1.0])).sum().backward()
        reg.update(model)
        torch.testing.assert_close(reg.fisher["a"], 0.9 * torch.tensor([9.0, 1.0]) + 0.1 * prev_fisher["a"])
        # the penalty still uses the normalised old Fisher
        torch.testing.assert_close(reg.old_importance["a"], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def _ref_local_pod(x, scales=(1, 2, 4)):  # transcription of PLOP's _local_pod (normalize False)
    b, w, emb = x.shape[0], x.shape[-1], []
    for scale in scales:
        k = w // scale
        for i in range(scale):
            for j in range(scale):
                t = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                emb += [t.mean(dim=3).view(b, -1), t.mean(dim=2).view(b, -1)]
    return torch.cat(emb, dim=1)


def test_plop_preset_pod_matches_reference_transcription():
    """6 maps (4 stages + pre_logits + logits), sum-collapse of new logits, pow, local POD, 0.01 / 0.0005 factors,
    sqrt(C / C_new) schedule, division by the number of maps."""
    import math
    from types import SimpleNamespace

    from methods.pod import PODDistillation, pod_loss
    from methods.presets import PRESETS

    torch.manual_seed(0)
    b, n_old, n_all = 2, 16, 17
    shapes = [(8, 16, 16), (12, 8, 8), (16, 4, 4), (20, 4, 4), (6, 4, 4)]
    old = [torch.randn(b, *s, dtype=torch.float64) for s in shapes] + [torch.randn(b, n_old, 4, 4).double()]
    new = [torch.randn(b, *s, dtype=torch.float64) for s in shapes] + [torch.randn(b, n_all, 4, 4).double()]
    cfg = SimpleNamespace(**{**PRESETS["PLOP"], "pod_prepro": "pow", "no_pod_schedule": False, "spp_scales": [1, 2, 4]})
    got = pod_loss(old, new, PODDistillation.config_from(cfg), n_old=n_old, n_classes=n_all, n_new=1)
    want = 0.0
    for i, (a, n) in enumerate(zip(old, new)):
        if a.shape[1] != n.shape[1]:
            _n = torch.zeros_like(a)
            _n[:, 0] = n[:, 0] + n[:, n_old:].sum(dim=1)
            _n[:, 1:] = n[:, 1:n_old]
            n = _n
        dist = torch.linalg.vector_norm(_ref_local_pod(a.pow(2)) - _ref_local_pod(n.pow(2)), dim=-1).mean()
        want += (0.0005 if i == len(old) - 1 else 0.01) * dist * math.sqrt(n_all / 1)
    torch.testing.assert_close(got, want / len(old))
