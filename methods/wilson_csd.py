"""CSD on WILSON's localizer at a weak step (weak-steps.md section 3; CSD, BMVC 2023, published on IRN / MCTformer
only, so this combination is unpublished). From ``--pseudo_ep`` on, the images of a batch that carry two new classes
or more (the anchors, CSD's multi-label domain) each get a source among the batch's one-new-class images, drawn by
co-occurrence over the step's image labels; the source's confident foreground and background come from the
localizer's own masks (the weak-step labeler, evaluation mode, no gradient). Both composites and the sources are
appended to the batch (label 255, excluded from WILSON's terms); the localizer's maps of each composite are pulled
towards the source's at the pasted cells (KL, the source detached).

Differences from the spec, said in docs/wilson.md: sources are drawn from the same batch (no side loader), so an
anchor gets no composite when its batch has no single-new-class image of a drawable class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weaksup import csd


@dataclass
class Appended:
    """What :class:`LocalizerCSD` appended to a batch: ``n`` original rows, then ``k`` sources, ``k`` foreground and
    ``k`` background composites; per pair the pasted pixels and the source-to-composite shift (pixels)."""

    n: int
    k: int
    wheres: list = field(default_factory=list)  # [(fg_where, bg_where)] (H, W) bool
    shifts: list = field(default_factory=list)  # [(fg_shift, bg_shift)]


class LocalizerCSD:
    def __init__(self, *, img_labels_new: np.ndarray, n_old: int, stride: int, pairs: int, lambdas: str, seed: int):
        self.n_old, self.stride, self.pairs, self.seed = n_old, stride, pairs, seed
        self.lambda_fg, self.lambda_bg = csd.LAMBDA_ORDERS[lambdas]
        _, targets = csd.domain_split(img_labels_new)
        self.cooc = csd.cooccurrence(img_labels_new, targets)
        self.calls = 0

    def draw(self, anchor_labels: np.ndarray, source_classes: dict[int, list[int]], rng) -> tuple[int, int] | None:
        """(new class c, batch row of a source) by co-occurrence among the classes with a source in the batch."""
        available = np.zeros(len(self.cooc), dtype=bool)
        available[list(source_classes)] = True
        if not available.any():
            return None
        present = np.flatnonzero(anchor_labels > 0)
        weights = self.cooc[present].sum(0).astype(np.float64) * available
        if weights.sum() == 0:
            weights = available.astype(np.float64)
        c = int(rng.choice(len(weights), p=weights / weights.sum()))
        return c, int(rng.choice(source_classes[c]))

    def compose(self, images: Tensor, img_labels: Tensor, labeler, epoch: int, step: int):
        """``(images, img_labels, Appended | None)`` with the sources and composites appended (at most ``pairs``)."""
        self.calls += 1
        n = images.shape[0]
        new = img_labels[:, -self.cooc.shape[0]:].detach().cpu().numpy()  # one host copy per batch (--csd only)
        counts = (new > 0).sum(1)
        anchors = np.flatnonzero(counts >= 2)[:self.pairs or max(1, n // 4)]
        singles = np.flatnonzero(counts == 1)
        if len(anchors) == 0 or len(singles) == 0:
            return images, img_labels, None
        masks = labeler(images[singles], img_labels[singles])  # (S, h, w) class ids, 255 = none
        masks = F.interpolate(masks[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].long()
        row = {int(s): i for i, s in enumerate(singles)}
        source_classes: dict[int, list[int]] = {}
        for s in singles:
            c = int(np.flatnonzero(new[s] > 0)[0])
            if bool((masks[row[int(s)]] == self.n_old + c).any()):
                source_classes.setdefault(c, []).append(int(s))
        rng = np.random.default_rng([self.seed, step, epoch, self.calls])
        picked, appended = [], Appended(n=n, k=0)
        for a in anchors:
            drawn = self.draw(new[a], source_classes, rng)
            if drawn is None:
                break
            c, s = drawn
            mask = masks[row[s]]
            out = csd.composites(images[a], images[s], mask == self.n_old + c, mask == 0, stride=self.stride,
                                 rng=rng)
            picked.append((a, s, c, out))
            appended.wheres.append((out["fg_where"], out["bg_where"]))
            appended.shifts.append((out["fg_from"], out["bg_from"]))
        if not picked:
            return images, img_labels, None
        appended.k = len(picked)
        sources = images[[s for _, s, _, _ in picked]]
        fg = torch.stack([o["fg"] for _, _, _, o in picked])
        bg = torch.stack([o["bg"] for _, _, _, o in picked])
        labels_src = img_labels[[s for _, s, _, _ in picked]]
        labels_fg = img_labels[[a for a, _, _, _ in picked]].clone()
        for i, (_, _, c, _) in enumerate(picked):
            labels_fg[i, labels_fg.shape[1] - self.cooc.shape[0] + c] = 1
        labels_bg = img_labels[[a for a, _, _, _ in picked]]
        return (torch.cat([images, sources, fg, bg]), torch.cat([img_labels, labels_src, labels_fg, labels_bg]),
                appended)

    def loss(self, z: Tensor, appended: Appended) -> dict[str, Tensor]:
        """KL terms on the localizer's train-mode maps ``z`` of the whole composed batch."""
        n, k = appended.n, appended.k
        p = z.float().softmax(1)
        l_fg, l_bg = z.new_zeros(()), z.new_zeros(())
        for i in range(k):
            source = p[n + i]
            for which, (where, shift) in enumerate(zip(appended.wheres[i], appended.shifts[i])):
                cells = csd.cells(where, self.stride)
                cells = cells[:z.shape[-2], :z.shape[-1]]
                kl = csd.shifted_kl(source, p[n + (1 + which) * k + i], cells,
                                    (shift[0] // self.stride, shift[1] // self.stride))
                if which == 0:
                    l_fg = l_fg + kl / k
                else:
                    l_bg = l_bg + kl / k
        return {"loss_csd_fg": self.lambda_fg * l_fg, "loss_csd_bg": self.lambda_bg * l_bg}
