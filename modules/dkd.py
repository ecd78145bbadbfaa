"""DKD's head layout (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD fb4693f, ``models/model.py``), registered here:

* head layout ``aux_first``: a one-channel *auxiliary* classifier in front of the step-0 foreground classes, then
  one head per later step. DKD has no background channel, so channel 0 is the auxiliary classifier and class ``k``
  stays on channel ``k``, as in the per-step layout (STAR keeps the same layout; docs/dkd.md, docs/star.md).
"""
from __future__ import annotations

from typing import Sequence

from modules.registry import HEAD_LAYOUTS

AUXILIARY = 0  # output channel of the auxiliary classifier


@HEAD_LAYOUTS.register("aux_first")
def aux_first_layout(classes: Sequence[int]) -> list[int]:
    if classes[0] < 2:
        raise ValueError(f"the aux_first layout needs a first step with a foreground class, got classes {classes}")
    return [1, classes[0] - 1, *classes[1:]]
