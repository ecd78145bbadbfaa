"""AWT channel mask for the union of the new classes of a step (same flags as run.py).

    python attribute.py --dataset voc --task 15-1 --step 1 --name MiB --method MiB --att 25 --mask_att [...]

Loads the model of step t-1 (a missing checkpoint is an error), attributes the background logit to the input of
the step-0 classifier on the step's training images (new-class pixels with --mask_att), selects the top --att %
channels and writes ``methods.awt.channels_path(cfg, t)`` (a CPU bool tensor [C]) and the scores next to it.
run.py computes the same file itself when it is missing; see docs/awt.md.
"""
from __future__ import annotations

import logging
import sys

from experiment.argparser import get_argparser
from experiment.builders import build_step_datasets, cpu_threads, select_device
from experiment.checkpoints import load_old_model
from experiment.config import parse_config
from methods import awt, build_method
from methods.channel_masks import write_mask
from utils.errors import UserError, one_line
from utils.logger import setup_logging

log = logging.getLogger("attribute")


USAGE = "%(prog)s --dataset D --data_root PATH --task T --step N [N ...] --name NAME --att 25 [--mask_att] [...]"
DESCRIPTION = (
    "AWT, step 1 of 2 (optional: run.py computes a missing mask itself): score the channels of the classifier input "
    "that matter for the new classes of each --step, by Integrated Gradients of the previous-step model's "
    "background logit on the step's training images (only new-class pixels with --mask_att), keep the top --att % "
    "and write the mask to {channels_dir}/{task}-{dataset}_{name}/ (see docs/awt.md). Needs the checkpoint of step "
    "t-1 (same --checkpoint/--name as run.py, or --step_ckpt). Takes run.py's flags; an existing mask is "
    "recomputed and replaced.")
CLASS_DESCRIPTION = (
    "AWT with one mask per new class: as attribute.py, but each new class of the step gets its own top --att % "
    "channels (needs --mask_att; --att_accumulate_classes reproduces the released script, where class k used the "
    "pixels of classes 1..k). run.py uses these masks with --att_per_class. Takes run.py's flags.")


def run_attribution(argv=None, *, per_class: bool = False) -> int:
    """attribute.py / attribute_class.py: same flags as run.py; writes the channel mask of every ``--step`` > 0
    (always recomputed, overwriting an existing file). Exit 0 on success, 2 with ``error: ...`` on a UserError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        notes: list[str] = []
        cfg = parse_config(argv, parser=get_argparser(usage=USAGE, description=CLASS_DESCRIPTION if per_class
                                                      else DESCRIPTION), notes=notes)
        setup_logging(cfg.debug)
        for note in notes:
            log.warning("%s", note)
        awt.validate_awt_args(cfg)
        if cfg.no_att or cfg.random_channels:
            raise UserError("nothing to attribute with --no_att or --random_channels (run.py needs no mask then)")
        if float(cfg.att) <= 0:
            raise UserError("pass --att in (0, 100], e.g. --att 25: the percentage of channels to select")
        if per_class and not cfg.mask_att:
            raise UserError("attribute_class.py needs --mask_att (per-class masks come from each class's pixels)")
        method = build_method(cfg)
        device = select_device(cfg)
        steps = [int(s) for s in cfg.step]
        if any(s < 1 for s in steps):
            raise UserError(f"attribution is for incremental steps: --step must be >= 1, got {steps}")
        with cpu_threads(cfg) as threads:
            log.info("%s", threads)
            for i, step in enumerate(steps):
                model_old = load_old_model(cfg, step, device, first_step_of_call=(i == 0), method=method)
                mask, result, meta = awt.compute_mask(cfg, step, model_old, device, per_class=per_class,
                                                      dataset=build_step_datasets(cfg, step)[0],
                                                      source=method.transfer_source(model_old))
                path = awt.channels_path(cfg, step, per_class=per_class)
                write_mask(path, mask, result, meta, plot=bool(cfg.att_plot))
                print(f"step {step}: wrote {path} ({meta['selected']} of {mask.shape[-1]} channels"
                      f"{f' x {mask.shape[0]} classes' if per_class else ''}; {result.n_images} images, skipped "
                      f"{result.n_skipped.tolist()})")
                del model_old
        return 0
    except UserError as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the masks already reported as written are complete, the step being attributed wrote "
              "nothing; rerun the command to compute it", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    return run_attribution(argv, per_class=False)


if __name__ == "__main__":
    sys.exit(main())
