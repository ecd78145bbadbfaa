"""Evaluate a step checkpoint on a data split and write pictures of its predictions.

    python evaluate.py --dataset voc --data_root PascalVOC12 --task 15-1 --name MiB --step 5
        [--ckpt PATH] [--split val|train] [--crop_val] [--out_dir samples/ --save_samples 16] [--erase_class K]

Takes the same flags as run.py (model, task, checkpoint naming). Passing ``--crop_val`` evaluates at full resolution
(batch 1), as in the reference. Prints per-class IoU and old/new/all mean IoU; with ``--out_dir`` writes
``metrics.json`` and PNG panels (image | ground truth | prediction, in the dataset palette). ``--erase_class K``
evaluates only the images that hold class K (its index in the report), with its pixels filled from the rest of the
image and ignored (DropClass's supplementary Table B-1: how much the other classes depend on K's presence);
``--images_with K`` evaluates the same images with the same pixels ignored but K left in the image (the control).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

from dataset.erase import EraseClass
from dataset.readers import space_reader
from dataset.tasks import order, score_groups, test_sources
from experiment.argparser import get_argparser
from experiment.builders import (build_model, build_step_datasets, cpu_threads, extra_test_sets, resolve_precision,
                                 select_device)
from experiment.checkpoints import ckpt_path, load_weights
from experiment.config import parse_config, replace
from experiment.validate import check_writable
from methods import build_method
from metrics import summary
from train import evaluate, split_item
from utils.data import build_loader
from utils.errors import UserError
from utils.flags import ArgumentParser, nonnegative_int, path_value
from utils.io import atomic_write, atomic_write_text
from utils.logger import setup_logging
from utils.progress import track
from utils.visualize import SampleCollector, index_to_class_lut

log = logging.getLogger("evaluate")


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(parents=[get_argparser(add_help=False)], description=__doc__,
                            usage="%(prog)s [run.py flags] [--split val|train] [--out_dir DIR [--save_samples N]]")
    g = parser.add_argument_group("evaluate")
    g.add_argument("--split", default="val", choices=["val", "train"], help="data split to evaluate on")
    g.add_argument("--test_source", default=None,
                   help="cross-dataset tasks: the source whose images to evaluate (coco-voc: coco or voc; default: "
                        "the first, as run.py's main results CSV)")
    g.add_argument("--out_dir", type=path_value, default=None, help="folder for metrics.json and PNG panels")
    g.add_argument("--save_samples", type=nonnegative_int, default=8, help="PNG panels written to --out_dir")
    g.add_argument("--erase_class", type=int, default=None, metavar="K",
                   help="evaluate the images holding class K (index in the report) with K erased: its pixels filled "
                        "from the rest of the image and ignored in the labels")
    g.add_argument("--images_with", type=int, default=None, metavar="K",
                   help="evaluate only the images holding class K, its pixels ignored but left in the image (the "
                        "control of --erase_class K)")
    g.add_argument("--pseudo_labels", type=path_value, default=None, metavar="DIR",
                   help="weak-shot tasks (ws*): write a label PNG per training image into the new folder DIR (the "
                        "predicted pixels of the novel classes the image holds, the base classes' ground truth, the "
                        "rest 255: SimFormer's pseudo-labelling) for run.py --novel_has_mask --train_labels DIR")
    return parser


def save_png(array, path: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def format_report(values: dict, class_names: list[str]) -> str:
    """The per-class IoU table and the summary line, from :func:`metrics.summary.compute`'s values."""
    lines = ["| class | IoU (%) |", "|---|---:|"]
    for i, v in values["class_iou"].items():
        name = class_names[i] if i < len(class_names) else str(i)
        lines.append(f"| {i} {name} | {summary.percent(v, missing='absent')} |")
    lines += ["", summary.format_line(values, ("pixel_acc", *summary.SUMMARY))]
    return "\n".join(lines)


def strict_json(value):
    """NaN and inf (a mean over no class, e.g. "new" at step 0) become null: metrics.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def test_dataset(cfg, step: int):
    """The cumulative test set of ``step``: the first test source's, or ``--test_source``'s."""
    sources = list(test_sources(cfg.dataset, step))
    if cfg.test_source is None or cfg.test_source == sources[0]:
        return build_step_datasets(cfg, step)[2]
    extra = extra_test_sets(cfg, step)
    if cfg.test_source not in extra:
        raise UserError(f"--test_source {cfg.test_source}: --dataset {cfg.dataset} tests step {step} on "
                        f"{', '.join(sources)}")
    return extra[cfg.test_source]


def load_step_model(cfg, method, step: int, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg, step, pretrained=False, method=method).to(device)
    load_weights(model, cfg.ckpt or ckpt_path(cfg, step), strict=cfg.strict_weights, what="step checkpoint", cfg=cfg)
    return model


def pseudo_mask(pred: torch.Tensor, label: torch.Tensor, base: torch.Tensor, novel: torch.Tensor) -> torch.Tensor:
    """SimFormer's pseudo-label of one image (report indices; ``base``/``novel``: boolean per index): the predicted
    pixels of the novel classes its ground truth holds, then the base classes' ground truth over them, the rest 255."""
    present = torch.zeros_like(novel)
    present[label[label != 255].long().unique()] = True
    present &= novel
    out = torch.where(present[pred], pred, torch.full_like(pred, 255))
    is_base = torch.cat([base, base.new_zeros(256 - len(base))])[label.long()]
    return torch.where(is_base, label.to(out.dtype), out)


def write_pseudo_labels(cfg, method) -> int:
    """Every training image's pseudo-mask (:func:`pseudo_mask`) as ``{folder}/{image stem}.png`` in train ids,
    written into ``{folder}.partial`` and renamed at the end: a killed run leaves no folder that looks complete."""
    step, folder = cfg.step[0], cfg.pseudo_labels
    groups = score_groups(cfg.dataset, cfg.task, step)
    if groups is None:
        raise UserError(f"--pseudo_labels writes a weak-shot task's pseudo-masks; task {cfg.task} of {cfg.dataset} "
                        "is not one (choose a ws* task)")
    if os.path.exists(folder):
        raise UserError(f"--pseudo_labels {folder} exists; give a new folder (nothing there is overwritten)")
    device = select_device(cfg)
    model = load_step_model(cfg, method, step, device)
    model.eval()
    # full images (no centre crop), whatever --crop_val says: a mask per image
    data = copy.copy(build_step_datasets(replace(cfg, val_on_trainset=True, crop_val=False), step)[2])
    data.idxs = np.arange(len(data.reader))  # every training image: --train_labels reads one label per image
    stems = [os.path.splitext(os.path.basename(img))[0] for img, _ in data.reader.samples]
    if len(set(stems)) != len(stems):
        raise UserError(f"--pseudo_labels: the training images of {cfg.dataset} share file names; the masks are "
                        "named by image file name")
    classes = order(cfg.dataset, cfg.task, step)
    base = torch.zeros(len(classes), dtype=torch.bool)
    novel = base.clone()
    base[list(groups[0])], novel[list(groups[1])] = True, True
    to_ids = torch.tensor([*classes, *[255] * (256 - len(classes))], dtype=torch.uint8)  # report index -> train id
    loader = build_loader(data, batch_size=1, train=False, num_workers=cfg.num_workers, seed=cfg.random_seed)
    precision = resolve_precision(cfg, device)
    partial = folder.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for stem, item in zip(stems, track(loader, "pseudo-labels (images)", bar=not cfg.no_progress)):
        images, labels, _ = split_item(item)
        with precision.autocast():
            logits, _ = model(precision.images(images, device))
        pred = method.predict(logits).argmax(dim=1)[0].cpu()
        save_png(to_ids[pseudo_mask(pred, labels[0], base, novel).long()].numpy(), os.path.join(partial, stem + ".png"))
    os.replace(partial, folder)
    log.info("wrote %d pseudo-masks to %s", len(stems), folder)
    return len(stems)


def evaluate_checkpoint(cfg, method) -> dict:
    """Load the step's checkpoint, evaluate it on the chosen split, optionally write pictures (``method``: the
    call's method stack)."""
    step = cfg.step[0]
    device = select_device(cfg)
    model = load_step_model(cfg, method, step, device)
    data_cfg = replace(cfg, val_on_trainset=cfg.split == "train")
    test_ds = method.wrap_dataset("test", test_dataset(data_cfg, step), step)
    erased = None
    if cfg.erase_class is not None and cfg.images_with is not None:
        raise UserError("--erase_class and --images_with exclude each other: run one evaluation with each")
    selected = cfg.erase_class if cfg.erase_class is not None else cfg.images_with
    if selected is not None:
        flag = "--erase_class" if cfg.erase_class is not None else "--images_with"
        n_classes = sum(model.classes)
        if not 1 <= selected < n_classes:
            raise UserError(f"{flag} {selected}: give a foreground class index 1..{n_classes - 1} of step {step} "
                            "(the report's first column)")
        test_ds = EraseClass(test_ds, selected, erase=cfg.erase_class is not None)
        if len(test_ds) == 0:
            raise UserError(f"{flag} {selected}: no image of the {cfg.split} split holds that class")
        erased = {"class": selected, "images": len(test_ds), "erased": cfg.erase_class is not None}
    loader = build_loader(test_ds, batch_size=cfg.batch_size if cfg.crop_val else 1, train=False,
                          num_workers=cfg.num_workers, seed=cfg.random_seed)
    reader = space_reader(cfg.dataset)
    lut = index_to_class_lut(order(cfg.dataset, cfg.task, step))
    samples = SampleCollector(cfg.save_samples if cfg.out_dir else 0, reader.colorize, lut)
    cm = evaluate(model, loader, n_classes=sum(model.classes), device=device,
                  precision=resolve_precision(cfg, device), show_progress=not cfg.no_progress, sample_hook=samples,
                  predict=method.predict, what=f"step {step} evaluation ({cfg.split} split)")
    res = cm.results()
    values = summary.compute(summary.ClassScores.from_results(res, model.classes,
                                                              score_groups(cfg.dataset, cfg.task, step)))
    split = {k: values[k] for k in summary.SUMMARY}
    names = [reader.CLASS_NAMES[c] for c in order(cfg.dataset, cfg.task, step)]
    if erased:
        print(f"only the {erased['images']} images holding class {erased['class']} ({names[erased['class']]}), "
              + ("with it erased and ignored" if erased["erased"] else "with it ignored but not erased"))
    print(format_report(values, names))
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        for k, picture in enumerate(samples.panels):
            save_png(picture, os.path.join(cfg.out_dir, f"sample_{k:03d}.png"))
        metrics = {"step": step, "split": cfg.split, "full_resolution": not cfg.crop_val, **split,
                   "mIoU": res["Mean IoU"], "overall_acc": values["pixel_acc"],
                   "class_iou": {names[i]: v for i, v in values["class_iou"].items()},
                   **({"erased": {**erased, "name": names[erased["class"]]}} if erased else {})}
        atomic_write_text(os.path.join(cfg.out_dir, "metrics.json"), json.dumps(strict_json(metrics), indent=2,
                                                                                 allow_nan=False))
    return {**res, **split, **({"erased": erased} if erased else {})}


def main(argv=None) -> int:
    cfg = None
    try:
        notes: list[str] = []
        cfg = parse_config(argv, parser=get_parser(), notes=notes)
        setup_logging(cfg.debug)
        for note in notes:
            log.warning("%s", note)
        if len(cfg.step) != 1:
            raise UserError("evaluate.py takes one --step")
        if cfg.out_dir:
            check_writable(cfg.out_dir, "--out_dir")
        if cfg.pseudo_labels and (cfg.out_dir or cfg.erase_class is not None or cfg.images_with is not None):
            raise UserError("--pseudo_labels writes masks only: drop --out_dir, --erase_class and --images_with")
        method = build_method(cfg)
        with cpu_threads(cfg) as threads, torch.no_grad():
            log.info("%s", threads)
            if cfg.pseudo_labels:
                write_pseudo_labels(cfg, method)
            else:
                evaluate_checkpoint(cfg, method)
        return 0
    except UserError as exc:
        if cfg is not None and cfg.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written for this evaluation (metrics.json, the pictures and the "
              "--pseudo_labels folder are written at the end); rerun the command", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
