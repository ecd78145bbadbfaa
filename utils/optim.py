"""Parameter groups (with the reference's freezing options), SGD and the learning-rate schedule."""
from __future__ import annotations

import torch

from utils.errors import UserError

FREEZE_FLAGS = ("freeze", "freeze_old", "freeze_old_and_FE", "freeze_all_but_new")


def _freeze(params) -> None:
    for p in params:
        p.requires_grad_(False)


def apply_freezing(model, cfg, step: int) -> None:
    """Set ``requires_grad`` for the reference's freezing options (old classifiers exist only at step > 0)."""
    chosen = [f for f in FREEZE_FLAGS if getattr(cfg, f)]
    if len(chosen) > 1:
        raise UserError(f"choose at most one of --{', --'.join(chosen)}")
    old_cls = [p for m in model.cls[:-1] for p in m.parameters()] if step > 0 else []
    if cfg.freeze:
        _freeze(model.body.parameters())
    elif cfg.freeze_old:
        _freeze(old_cls)
    elif cfg.freeze_old_and_FE:
        _freeze(model.body.parameters())
        _freeze(old_cls)
    elif cfg.freeze_all_but_new:
        _freeze(model.body.parameters())
        _freeze(model.head.parameters())
        _freeze(old_cls)
    if cfg.fix_bn:
        model.fix_bn()


def build_param_groups(model, cfg, lr: float, step: int) -> list[dict]:
    """Body, head and classifier groups with weight decay; ``--lr_old`` gives old classifiers ``lr_old * lr``;
    parameters outside body, head and classifiers (a method's own modules) in a last group."""
    def trainable(params):
        return [p for p in params if p.requires_grad]

    wd = cfg.weight_decay
    groups = [{"params": trainable(model.body.parameters()), "weight_decay": wd, "lr": lr},
              {"params": trainable(model.head.parameters()), "weight_decay": wd, "lr": lr}]
    if cfg.lr_old is not None and step > 0:
        groups.append({"params": trainable(p for m in model.cls[:-1] for p in m.parameters()),
                       "weight_decay": wd, "lr": cfg.lr_old * lr})
        groups.append({"params": trainable(model.cls[-1].parameters()), "weight_decay": wd, "lr": lr})
    else:
        groups.append({"params": trainable(model.cls.parameters()), "weight_decay": wd, "lr": lr})
    # modules a method adds outside body, head and cls (none in the reference family) train at the step's lr
    grouped = {id(p) for part in (model.body, model.head, model.cls) for p in part.parameters()}
    groups.append({"params": trainable(p for p in model.parameters() if id(p) not in grouped),
                   "weight_decay": wd, "lr": lr})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("every parameter is frozen: nothing to train (check the --freeze* flags)")
    return groups


def build_optimizer(groups: list[dict], cfg, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, as every reference training of the class-incremental family used, or AdamW
    (``--optimizer adamw``: MaskFormer and SimFormer); each group carries its own weight decay."""
    if getattr(cfg, "optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


WARMUP_FACTOR = 0.001  # warm_poly starts at this share of the lr (SSUL, DKD, STAR)


def build_scheduler(optimizer, cfg, max_iters: int):
    """Poly (``(1 - it/max_iters)^power``, stepped per iteration; with ``--lr_min`` never below it, as SSUL),
    warm_poly (SSUL, DKD, STAR on ADE: poly times a linear warm-up from 0.001 over the first --warmup_fraction of the
    iterations), warmup (WILSON: the lr stays constant for the first --pseudo_ep epochs, then follows poly counted
    from iteration 0, so it drops to (1 - pseudo_ep/epochs)^power at the switch) or StepLR."""
    total = max(max_iters, 1)
    lr_min = float(getattr(cfg, "lr_min", 0.0) or 0.0)
    if cfg.lr_policy == "poly" and lr_min == 0.0:  # the reference's schedule, unchanged
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=cfg.lr_power)
    if cfg.lr_policy == "warmup":  # WILSON's WarmUpPolyLR: constant while the localizer warms up, then poly
        start = total * int(getattr(cfg, "pseudo_ep", 0)) // max(int(cfg.epochs), 1)  # measured from iteration 0

        def constant_then_poly(it: int) -> float:
            return 1.0 if it < start else (1.0 - min(it, total) / total) ** cfg.lr_power

        return torch.optim.lr_scheduler.LambdaLR(optimizer, constant_then_poly)
    if cfg.lr_policy in ("poly", "warm_poly"):
        warmup = int(total * float(getattr(cfg, "warmup_fraction", 0.1))) if cfg.lr_policy == "warm_poly" else 0

        def factor(it: int, base: float) -> float:
            f = (1.0 - min(it, total) / total) ** cfg.lr_power
            if it < warmup:
                alpha = it / warmup
                f *= WARMUP_FACTOR * (1 - alpha) + alpha
            return max(f, lr_min / base) if cfg.lr_policy == "poly" and base > 0 else f

        lambdas = [lambda it, base=group["lr"]: factor(it, base) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_step, gamma=cfg.lr_decay_factor)


def forget_state_of_changed(optimizer: torch.optim.Optimizer | None, before: dict) -> int:
    """Zero the optimiser's per-element state (momentum, Adam moments) where a parameter's value differs from
    ``before[param]`` (a copy taken before it was re-initialised in the middle of a step), so that the old
    momentum does not push the new values; returns how many elements were reset."""
    if optimizer is None:
        return 0
    reset = 0
    for param, old in before.items():
        changed = param.detach() != old
        if not bool(changed.any()):
            continue
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(changed, 0)
        reset += int(changed.sum())
    return reset
