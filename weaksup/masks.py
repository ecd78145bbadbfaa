"""From class activation maps to labels, and the standard WSSS measurements: CAM seeds (IRN's ``eval_cam``: a
constant background score against the normalised CAMs, argmax), the confident foreground / background masks IRN
feeds its relation network (``cam_to_ir_label``, without the dense CRF: see docs/wsss.md), and mIoU against the
ground truth."""
from __future__ import annotations

import numpy as np

SEED_BG = 0.15  # IRN run_sample.py --cam_eval_thres
CONF_FG, CONF_BG = 0.30, 0.05  # --conf_fg_thres, --conf_bg_thres
IGNORE = 255


def labels_from_cams(cams: np.ndarray, keys: np.ndarray, bg_score: float) -> np.ndarray:
    """(H, W) uint8 labels: argmax over [constant ``bg_score``, cams (k, H, W)], mapped to 0 / the ``keys`` (class
    ids, 1-based)."""
    padded = np.concatenate([np.full((1, *cams.shape[1:]), bg_score, cams.dtype), cams], 0)
    return np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)[padded.argmax(0)]


def confident_mask(cams: np.ndarray, keys: np.ndarray, fg: float = CONF_FG, bg: float = CONF_BG) -> np.ndarray:
    """IRN's confident labels: the class where it wins against ``fg``; background where even ``bg`` wins; 255 (not
    sure) between."""
    fg_labels = labels_from_cams(cams, keys, fg)
    bg_labels = labels_from_cams(cams, keys, bg)
    out = fg_labels.copy()
    out[fg_labels == 0] = IGNORE
    out[(fg_labels == 0) & (bg_labels == 0)] = 0
    return out


def confusion(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n) counts of (ground truth, prediction) over pixels whose ground truth and prediction are < n (255 left
    out)."""
    keep = (gt < n_classes) & (pred < n_classes)
    return np.bincount(n_classes * gt[keep].astype(np.int64) + pred[keep], minlength=n_classes ** 2).reshape(
        n_classes, n_classes)


def miou(conf: np.ndarray) -> tuple[float, list[float]]:
    """Mean IoU over the classes that appear in the ground truth or the prediction, and the per-class IoUs (nan for
    neither)."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou)), iou.tolist()
