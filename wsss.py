"""Weakly-supervised semantic segmentation from image labels (IRN's pipeline, optionally with CSD), one stage per
command; every stage writes files the next reads and continues where a killed run stopped (docs/wsss.md).

    python wsss.py train_cam  --dataset voc --data_root PascalVOC12 --out runs/wsss/irn
    python wsss.py make_cam   --dataset voc --data_root PascalVOC12 --out runs/wsss/irn
    python wsss.py make_masks --dataset voc --data_root PascalVOC12 --out runs/wsss/irn
    python wsss.py train_seg  --dataset voc --data_root PascalVOC12 --out runs/wsss/irn -- --epochs 30 ...
    # = run.py --task offline --step 0 --train_labels runs/wsss/irn/masks (flags after -- go to run.py); its test
    #   mIoU joins the seed and mask mIoU in wsss.json, which report.py --wsss runs/wsss/irn shows
    # CSD on the classification stage, with the baseline's masks:
    python wsss.py train_cam --csd --csd_masks runs/wsss/irn/masks --out runs/wsss/csd ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

import run
from dataset.readers import READERS
from experiment.config import parse_config
from metrics.report import read_run, step_scores
from metrics.results import results_csv_path
from models.registry import BACKBONES
from utils.checkpoint import safe_load
from utils.errors import UserError, one_line
from utils.io import atomic_write_text
from utils.logger import setup_logging
from weaksup import pipeline
from weaksup.cam import CAMNet
from weaksup.masks import CONF_BG, CONF_FG, SEED_BG

log = logging.getLogger("wsss")
STAGES = ("train_cam", "make_cam", "make_masks", "train_seg")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--dataset", default="voc", choices=sorted(READERS))
    p.add_argument("--data_root", required=True)
    p.add_argument("--out", required=True, help="folder of the run: cam_net.pth, cams/, masks/, wsss.json")
    p.add_argument("--cache_root", default="data", help="where the class index of the split is cached")
    p.add_argument("--backbone", default="tv_resnet50", help="IRN: ResNet-50, torchvision layout")
    p.add_argument("--no_pretrained", action="store_true", help="start from random weights (no ImageNet file)")
    p.add_argument("--pretrained_dir", default="pretrained")
    p.add_argument("--batch_size", type=int, default=16, help="IRN's --cam_batch_size")
    p.add_argument("--epochs", type=int, default=5, help="IRN's --cam_num_epoches")
    p.add_argument("--lr", type=float, default=0.1, help="IRN's --cam_learning_rate (classifier: 10x)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="IRN's --cam_weight_decay")
    p.add_argument("--crop_size", type=int, default=512, help="IRN's --cam_crop_size")
    p.add_argument("--resize_long", type=int, nargs=2, default=(320, 640),
                   help="range of the long side before the crop (IRN: 320 640)")
    p.add_argument("--scales", type=float, nargs="+", default=(1.0, 0.5, 1.5, 2.0), help="IRN's --cam_scales")
    p.add_argument("--seed_bg", type=float, default=SEED_BG, help="IRN's --cam_eval_thres (CAM seeds)")
    p.add_argument("--conf_fg", type=float, default=CONF_FG, help="IRN's --conf_fg_thres")
    p.add_argument("--conf_bg", type=float, default=CONF_BG, help="IRN's --conf_bg_thres")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("CSD (train_cam)")
    g.add_argument("--csd", action="store_true", help="add CSD's two KL consistency terms")
    g.add_argument("--csd_masks", default=None, help="masks/ of the finished baseline run (make_masks)")
    g.add_argument("--csd_lambdas", default="fg-bg", choices=["fg-bg", "bg-fg"],
                   help="which KL gets 0.01 and which 0.1 (the supplementary does not say): fg-bg = 0.01 on the "
                        "foreground paste, 0.1 on the background paste; bg-fg = swapped")
    return p


def build_net(args, n_classes: int) -> CAMNet:
    family = BACKBONES.get_entry(args.backbone, "--backbone")
    body = family.build(norm_act="bn", output_stride=16)
    if not args.no_pretrained:
        family.load_pretrained(body, os.path.join(args.pretrained_dir, family.pretrained_file("bn")))
    return CAMNet(body, n_classes)


def train_seg(args, run_flags: list[str]) -> int:
    """Stage 4: the framework's segmentation (run.py, task offline, step 0) on ``{out}/masks``; its test mIoU is
    added to ``{out}/wsss.json`` as ``seg_miou``. ``run_flags``: further run.py flags (backbone, epochs, ...)."""
    summary = os.path.join(args.out, "wsss.json")
    if not os.path.isfile(summary):
        raise UserError(f"train_seg: no {summary}; run make_masks first (same --out)")
    taken = {"--dataset", "--data_root", "--task", "--step", "--train_labels"} & set(run_flags)
    if taken:
        raise UserError(f"train_seg sets {sorted(taken)[0]} itself; drop it from the flags after --")
    argv = ["--dataset", args.dataset, "--data_root", args.data_root, "--task", "offline", "--step", "0",
            "--train_labels", os.path.join(args.out, "masks"), "--cache_root", args.cache_root, *run_flags]
    code = run.main(argv)
    if code != 0:
        return code
    cfg = parse_config(argv)
    csv = results_csv_path(cfg.results_dir, cfg.date, cfg.dataset, "offline", cfg.name)
    result = json.loads(open(summary, encoding="utf-8").read())
    result["seg_miou"] = 100 * step_scores(read_run(csv), 0)["all"]
    result["seg_results"] = csv
    atomic_write_text(summary, json.dumps(result, indent=1))
    log.info("train_seg: segmentation mIoU %.2f %% (%s), recorded in %s", result["seg_miou"], csv, summary)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = get_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    setup_logging(False)
    try:
        if args.csd and args.stage != "train_cam":
            raise UserError("--csd acts on train_cam only (the later stages read its CAM network)")
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        torch.manual_seed(args.seed)
        os.makedirs(args.out, exist_ok=True)
        reader = pipeline.build_reader(args)
        if args.stage == "make_masks":
            pipeline.make_masks(args, reader)
            return 0
        if args.stage == "train_seg":
            return train_seg(args, run_flags)
        net = build_net(args, reader.NUM_CLASSES - 1).to(device)
        if args.stage == "train_cam":
            pipeline.train_cam(args, net, reader, device)
            return 0
        weights = os.path.join(args.out, "cam_net.pth")
        if not os.path.isfile(weights):
            raise UserError(f"make_cam: no {weights}; run train_cam first (same --out)")
        net.load_state_dict(safe_load(weights, "CAM network")["model"])
        pipeline.make_cam(args, net, reader, device)
        return 0
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue (finished files are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
