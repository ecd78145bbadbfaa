"""IRN's pipeline against IRN + CSD (both lambda assignments) on synthetic VOC with co-occurring class pairs, several
seeds: CAM-seed, pseudo-mask and segmentation mIoU (csd.md / issue 30, part 4; docs/wsss.md).

    python scripts/wsss_comparison.py --out runs/wsss_comparison

Per seed: the baseline's four stages (train_cam, make_cam, make_masks, train_seg), then CSD's classification stage
with the baseline's masks (--csd_masks) and the same later stages, once per --csd_lambdas. Writes {out}/table.md and
{out}/results.json; finished stages are not redone (the stages' own resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import wsss  # noqa: E402
from scripts.weak_comparison import write_seed_table  # noqa: E402
from dataset.synthetic import generate  # noqa: E402

RUNS = {"IRN (confident masks)": [], "IRN + CSD (0.01 fg, 0.1 bg)": ["--csd_lambdas", "fg-bg"],
        "IRN + CSD (0.1 fg, 0.01 bg)": ["--csd_lambdas", "bg-fg"]}
KEYS = ("seed_miou", "mask_miou", "mask_coverage", "seg_miou")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--epochs", type=int, default=8, help="epochs of the classification stage")
    p.add_argument("--seg_epochs", type=int, default=4)
    args = p.parse_args(argv)
    data = os.path.join(args.out, "data")
    if not os.path.isdir(data):
        generate(data, "voc", size=args.size, n_train=args.train, n_val=60, seed=0,
                 cooccur=[(16, 18), (18, 20), (18, 9), (15, 13)])
    results: dict = {}
    for seed in args.seeds:
        base_out = None
        for label, flags in RUNS.items():
            out = os.path.join(args.out, f"seed{seed}", label.split(" (")[0].replace(" + ", "_").replace(" ", "_")
                               + ("" if not flags else "_" + flags[1]))
            common = ["--dataset", "voc", "--data_root", data, "--out", out, "--cache_root",
                      os.path.join(args.out, "cache"), "--backbone", "tv_resnet18", "--no_pretrained",
                      "--batch_size", "8", "--crop_size", str(args.size), "--resize_long", str(args.size * 3 // 4),
                      str(args.size * 5 // 4), "--scales", "1.0", "0.5", "1.5", "--seed", str(seed)]
            csd = ["--csd", "--csd_masks", os.path.join(base_out, "masks"), *flags] if flags else []
            assert wsss.main(["train_cam", *common, "--epochs", str(args.epochs), *csd]) == 0
            assert wsss.main(["make_cam", *common]) == 0
            assert wsss.main(["make_masks", *common]) == 0
            summary = json.load(open(os.path.join(out, "wsss.json"), encoding="utf-8"))
            if "seg_miou" not in summary:
                assert wsss.main(["train_seg", *common[:8], "--", "--backbone", "resnet18", "--no_pretrained",
                                  "--norm_act", "abn", "--crop_size", str(args.size), "--batch_size", "8",
                                  "--epochs", str(args.seg_epochs), "--lr", "0.01", "--num_workers", "0",
                                  "--no_progress", "--random_seed", str(seed), "--output_dir",
                                  os.path.join(out, "seg"), "--name", "seg", "--date", "cmp"]) == 0
                summary = json.load(open(os.path.join(out, "wsss.json"), encoding="utf-8"))
            results.setdefault(label, {})[seed] = {k: summary[k] for k in KEYS}
            base_out = base_out or out
    table = write_seed_table(args.out, ["seed mIoU", "mask mIoU", "mask coverage", "segmentation mIoU"], KEYS, results,
                             "per seed (seed / mask / seg)",
                             lambda v: f"{v['seed_miou']:.1f} / {v['mask_miou']:.1f} / {v['seg_miou']:.1f}", "; ")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
