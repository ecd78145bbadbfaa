"""AWT channel mask for the union of the new classes of a step (same flags as run.py).

    python attribute.py --dataset voc --task 15-1 --step 1 --name MiB --method MiB --att 25 --mask_att [...]

Loads the model of step t-1 (a missing checkpoint is an error), attributes the background logit to the input of
the step-0 classifier on the step's training images (new-class pixels with --mask_att), selects the top --att %
channels and writes ``methods.awt.channels_path(cfg, t)`` (a CPU bool tensor [C]) and the scores next to it.
run.py computes the same file itself when it is missing; see docs/awt.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from methods.awt import attribute_main  # noqa: E402


def main(argv=None) -> int:
    return attribute_main(argv, per_class=False)


if __name__ == "__main__":
    sys.exit(main())
