"""AWT channel masks, one per new class of a step (same flags as run.py; needs --mask_att).

    python attribute_class.py --dataset ade --task 100-10 --step 1 --name MiB --method MiB --att 25 --mask_att

Writes ``methods.awt.channels_path(cfg, t, per_class=True)``: a CPU bool tensor [N_new, C] and the scores next
to it. Each class's attributions are aggregated separately; --att_accumulate_classes reproduces the released
script, where class k's mask came from the attributions of classes 1..k. run.py uses this file with
--att_per_class (or when no union mask exists); see docs/awt.md.
"""
from __future__ import annotations

import sys

from attribute import run_attribution


def main(argv=None) -> int:
    return run_attribution(argv, per_class=True)


if __name__ == "__main__":
    sys.exit(main())
