"""Segmentation metrics as the reference computes them, with the confusion matrix kept on the device."""
from __future__ import annotations

import numpy as np
import torch

from utils.dist import all_reduce_sum

EPS = 1e-6  # the reference's denominator guard


class ConfusionMatrix:
    """``n x n`` matrix (rows: ground truth, columns: prediction) over the seen classes; 255 and unseen excluded."""

    def __init__(self, n_classes: int, device: torch.device | str = "cpu"):
        self.n = n_classes
        self.mat = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate a batch of predictions (B,H,W) and labels (B,H,W) without leaving the device."""
        # Invalid pixels (255, unseen classes) go to one extra bin that is dropped: no boolean indexing, so no
        # host-device synchronisation per batch (benchmarks/evaluation.py measures both).
        target = target.to(torch.int64)
        valid = (target >= 0) & (target < self.n)
        idx = torch.where(valid, target * self.n + pred.to(torch.int64), self.n * self.n)
        self.mat += torch.bincount(idx.flatten(), minlength=self.n * self.n + 1)[: self.n * self.n]

    def reduce(self) -> "ConfusionMatrix":
        """Sum over ranks once, at the end of an evaluation."""
        all_reduce_sum(self.mat)
        return self

    def matrix(self) -> np.ndarray:
        return self.mat.view(self.n, self.n).cpu().numpy().astype(np.float64)

    def results(self) -> dict:
        return metrics_from_matrix(self.matrix())


def metrics_from_matrix(hist: np.ndarray) -> dict:
    """Overall/mean accuracy, per-class IoU and accuracy and mean IoU over classes present in the ground truth."""
    diag = np.diag(hist)
    gt_sum = hist.sum(axis=1)
    pred_sum = hist.sum(axis=0)
    present = gt_sum > 0
    acc_cls = diag / (gt_sum + EPS)
    iou = diag / (gt_sum + pred_sum - diag + EPS)
    total = hist.sum()
    freq = gt_sum / max(total, 1)
    return {
        "Total samples": float(total),
        "Overall Acc": float(diag.sum() / max(total, 1)),
        "Mean Acc": float(acc_cls[present].mean()) if present.any() else 0.0,
        "FreqW Acc": float((freq[present] * iou[present]).sum()),
        "Mean IoU": float(iou[present].mean()) if present.any() else 0.0,
        "Class IoU": {i: (float(iou[i]) if present[i] else "X") for i in range(len(diag))},
        "Class Acc": {i: (float(acc_cls[i]) if present[i] else "X") for i in range(len(diag))},
        "Confusion Matrix": hist,
    }
