"""SimFormer's pixel-pixel similarity transfer (simformer.md section 4, from bcmi/SimFormer, CC BY-NC,
re-implemented from the facts), independent of the model that supplies the embeddings and score vectors: the SimNet,
the point sampling and pairing, its class-balanced loss on pairs with base labels, and its distillation onto score
vectors of pairs without. Used on MaskFormer's pixel embeddings (``methods/simformer.py``) and on DeepLab's
``pre_logits`` at WILSON's weak steps (``methods/wilson_simformer.py``).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.flags import nonnegative_float, positive_int

BASE_SHARE = 0.8  # of the J base points, inside the region of a base class both images hold (the rest elsewhere)
POINT_NOISE = 0.1  # points = top-J of (region + 0.1 U(0, 1)): uniform inside the region, outside when it is short
BALANCE_WINDOW, BALANCE_STRIDE = 25, 5  # positive / negative counts over the last 25 iterations, every 5th pair
DISTILL_CLAMP = 0.01  # "ce": teacher and student clamped to [0.01, 0.99]
EPS = 1e-6
DISTILL_FUNCS = ("cce", "ce")
STUDENTS = ("cross", "self")
PAIR_DEFAULTS = {"distill": 0.1, "points": 100, "func": "cce", "student": "cross"}


def add_pair_flags(group: argparse._ActionsContainer, prefix: str, helps: dict[str, str]) -> None:
    """The pair transfer's settings ``--{prefix}_distill``, ``_points``, ``_func`` and ``_student`` (defaults
    :data:`PAIR_DEFAULTS`), each with the caller's help text."""
    kinds = {"distill": dict(type=nonnegative_float), "points": dict(type=positive_int),
             "func": dict(choices=DISTILL_FUNCS), "student": dict(choices=STUDENTS)}
    for key, kind in kinds.items():
        group.add_argument(f"--{prefix}_{key}", default=PAIR_DEFAULTS[key], help=helps[key], **kind)


def changed_pair_flags(cfg: Any, prefix: str) -> list[str]:
    """The flags of :func:`add_pair_flags` that ``cfg`` sets away from their defaults."""
    return [f"--{prefix}_{key}" for key, default in PAIR_DEFAULTS.items()
            if getattr(cfg, f"{prefix}_{key}", default) != default]


class _Block(nn.Module):
    """SimFormer's residual fully connected block: two (linear, BN, ReLU), plus the input (projected with a ReLU
    when the width changes)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.fc2, self.bn2 = nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)
        self.project = nn.Linear(d_in, d_out) if d_in != d_out else None

    def forward(self, x: Tensor) -> Tensor:
        residual = F.relu(self.project(x)) if self.project is not None else x
        y = F.relu(self.bn1(self.fc1(x)))
        return F.relu(self.bn2(self.fc2(y))) + residual


class SimNet(nn.Module):
    """Pair of pixel embeddings (N, 2D) -> P(same class) (N,): three residual blocks of ``width``, a 2-way softmax."""

    def __init__(self, dim: int, width: int = 256, layers: int = 3):
        super().__init__()
        blocks, d = [], 2 * dim
        for _ in range(layers):
            blocks.append(_Block(d, width))
            d = width
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(width, 2)

    def forward(self, pairs: Tensor) -> Tensor:
        return self.out(self.blocks(pairs)).softmax(-1)[:, 1]


def sample_points(region: Tensor, k: int) -> Tensor:
    """Flat indices (k,) of ``k`` pixels of a (h, w) map: uniformly inside ``region`` (values 1), topped up with
    random pixels outside it when it holds fewer than ``k`` (SimFormer's top-k of region + 0.1 U(0, 1))."""
    score = region.flatten().float() + POINT_NOISE * torch.rand(region.numel(), device=region.device)
    return score.topk(min(k, region.numel())).indices


def pair_grid(a: Tensor, b: Tensor) -> Tensor:
    """(J, D), (K, D) -> (J * K, 2D): every point of ``a`` with every point of ``b``, ``a`` first."""
    j, k = a.shape[0], b.shape[0]
    return torch.cat([a[:, None].expand(j, k, -1), b[None].expand(j, k, -1)], -1).reshape(j * k, -1)


def choose_partners(novel: Tensor, mode: str) -> list[int]:
    """Each image's partner in the batch: itself (``self``), or (``cross``) a random image sharing one of its novel
    classes ((B, C) image labels), else a random other image."""
    b = novel.shape[0]
    if mode == "self" or b == 1:
        return list(range(b))
    shared = (novel.float() @ novel.float().T > 0).cpu()
    partners = []
    for i in range(b):
        candidates = [j for j in range(b) if j != i and bool(shared[i, j])]
        pool = candidates or [j for j in range(b) if j != i]
        partners.append(pool[int(torch.randint(len(pool), ()))])
    return partners


def distill_loss(teacher: Tensor, student: Tensor, func: str) -> Tensor:
    """Per pair: ``ce`` = BCE of the student against the teacher, both clamped to [0.01, 0.99]; ``cce`` =
    -relu(t - 0.5) log(s + 1) - relu(0.5 - t) log(2 - s) (SimFormer's names)."""
    if func == "ce":
        t, s = teacher.clamp(DISTILL_CLAMP, 1 - DISTILL_CLAMP), student.clamp(DISTILL_CLAMP, 1 - DISTILL_CLAMP)
        return -t * s.log() - (1 - t) * (1 - s).log()
    return -F.relu(teacher - 0.5) * torch.log(student + 1) - F.relu(0.5 - teacher) * torch.log(2 - student)


class BalanceCounts:
    """SimFormer's class-balancing weights of the SimNet loss: running counts of negative and positive pairs (every
    5th pair in both directions) over the last 25 iterations, starting from one of each; kept on the device."""

    def __init__(self):
        self.history: list[Tensor] = []

    def update(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """``target`` (P, J, K) in {0, 1}; returns (negative weight, positive weight) after adding it."""
        sub = target[:, ::BALANCE_STRIDE, ::BALANCE_STRIDE]
        counts = torch.stack([(sub == 0).sum(), (sub == 1).sum()]).float()
        self.history = (self.history + [counts])[-BALANCE_WINDOW:]
        total = torch.stack(([torch.ones(2, device=counts.device)] + self.history)[-BALANCE_WINDOW:]).sum(0)
        neg, pos = total[0], total[1]
        return pos / (pos + neg), neg / (pos + neg)

    def state_dict(self) -> dict:
        return {"history": [h.cpu() for h in self.history]}

    def load_state_dict(self, state: dict, device) -> None:
        self.history = [h.to(device) for h in state.get("history", [])]


def similarity_loss(simnet: SimNet, counts: BalanceCounts, flat: Tensor, labels: Tensor, partners: list[int],
                    points: int) -> Tensor:
    """The SimNet's loss on base pairs: per image and partner, ``points`` points each (80 % inside a base class both
    hold, else inside any base region; the rest outside), every anchor point with every partner point, target = same
    label; class-balanced BCE over the pairs with a base point. ``flat`` (B, h*w, D) embeddings (detached here),
    ``labels`` (B, h, w) base labels, 255 elsewhere."""
    base = labels != 255
    k_in = int(round(points * BASE_SHARE))
    feats, targets, valids = [], [], []
    present = [set(torch.unique(labels[i][base[i]]).tolist()) for i in range(len(partners))]
    for i, p in enumerate(partners):
        common = sorted(present[i] & present[p])
        if common:
            c = common[int(torch.randint(len(common), ()))]
            regions = [labels[i] == c, labels[p] == c]
        else:
            regions = [base[i], base[p]]
        idx = [torch.cat([sample_points(r, k_in), sample_points(~r, points - k_in)]) for r in regions]
        lab = [labels[j].flatten()[ix] for j, ix in zip((i, p), idx)]
        val = [base[j].flatten()[ix] for j, ix in zip((i, p), idx)]
        feats.append(pair_grid(flat[i][idx[0]], flat[p][idx[1]]))
        targets.append((lab[0][:, None] == lab[1][None, :]))
        valids.append(val[0][:, None] | val[1][None, :])
    target = torch.stack(targets).float()  # (P, J, J)
    valid = torch.stack(valids).float()
    pred = simnet(torch.cat(feats).detach()).reshape(target.shape)
    neg_w, pos_w = counts.update(target)
    weight = torch.where(target > 0, pos_w, neg_w)
    bce = F.binary_cross_entropy(pred.clamp(EPS, 1 - EPS), target, reduction="none")
    return (weight * bce * valid).sum() / valid.sum().clamp_min(EPS)


def distillation_loss(simnet: SimNet, scores: Tensor, flat: Tensor, region: Tensor, partners: list[int],
                      novel_labels: Tensor, points: int, func: str, student: str) -> Tensor:
    """The SimNet's judgement of pairs of ``region`` points (B, h*w; the pixels without base labels) distilled onto
    the novel-class score vectors ``scores`` (B, h*w, N), for the partners sharing a novel class (``novel_labels``
    (B, N)): teacher = SimNet on the cross-image pairs (no gradient), student = relu(cos) of the pair's two vectors
    (``cross``) or of the anchor's points with themselves (``self``, SimFormer's released code); mean over images."""
    shares = (novel_labels.float() @ novel_labels.float().T > 0).cpu()
    losses = []
    for i, p in enumerate(partners):
        if not bool(shares[i, p]):
            continue
        idx = [sample_points(region[j], points) for j in (i, p)]
        with torch.no_grad():
            teacher = simnet(pair_grid(flat[i][idx[0]], flat[p][idx[1]]).detach())
        a = scores[i][idx[0]]
        other = scores[p][idx[1]] if student == "cross" else scores[i][idx[0]]
        s = F.relu(F.cosine_similarity(a[:, None], other[None, :], dim=-1)).flatten()
        losses.append(distill_loss(teacher, s, func).mean())
    if not losses:
        return scores.sum() * 0
    return torch.stack(losses).mean()
