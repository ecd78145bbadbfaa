"""AWT: Attribution-aware Weight Transfer (Goswami et al., WACV 2023). See docs/awt.md."""
from __future__ import annotations

import argparse

IGNORED = "(ignored: dead flag in the reference code, accepted so published command lines run) "


def add_awt_args(parser: argparse.ArgumentParser) -> None:
    """Declare the AWT flags (reference names and defaults, plus this framework's own) in the group "AWT"."""
    g = parser.add_argument_group("AWT")
    g.add_argument("--init_balanced", action="store_true", default=False,
                   help="MiB initialisation of the new classifier (new weight := bg weight, biases := b_bg - log(N+1))")
    g.add_argument("--orig_init", action="store_true", default=False,
                   help="MiB initialisation (weight copy + bias trick); with --att the bg weight is added twice on "
                        "the selected channels, as in the reference")
    g.add_argument("--copy_bias", action="store_true", default=False,
                   help="with a channel mask: new and bg bias := b_bg - log(N_new+1)")
    g.add_argument("--copy", action="store_true", default=False,
                   help="selected channels are replaced by the bg weight instead of added to the random init")
    g.add_argument("--copy_share", type=float, default=0.0, help=IGNORED + "(passed but unused in AWT)")
    g.add_argument("--mask_att", action="store_true", default=False,
                   help="restrict attributions to the pixels of the step's new classes (absent: whole image)")
    g.add_argument("--mean_after_max", action="store_true", default=False,
                   help="aggregation: per-image max over positions, then mean over images")
    g.add_argument("--mean_after_avg", action="store_true", default=False,
                   help="aggregation: per-image spatial average, then mean over images")
    g.add_argument("--avg_after_mean", action="store_true", default=False,
                   help="aggregation: mean over images, then spatial average (default: mean over images, then max)")
    g.add_argument("--att", type=float, default=0.0,
                   help="percentage of classifier-input channels to transfer, in (0, 100]; 0 = no attribution "
                        "(10/25/50/75 select 26/64/128/192 of 256 channels)")
    g.add_argument("--no_att", action="store_true", default=False,
                   help="no attribution and no classifier initialisation at all (new classifier stays random)")
    g.add_argument("--random_channels", action="store_true", default=False,
                   help="ablation: transfer the bg weight on --rand random channels instead of attributed ones")
    g.add_argument("--rand", type=int, default=0, help="number of random channels for --random_channels (a count)")
    g.add_argument("--attribution", default="exact", choices=["exact", "captum"],
                   help="exact: closed-form Integrated Gradients (the attributed function is affine in the "
                        "classifier input); captum: Captum LayerIntegratedGradients as in the reference")
    g.add_argument("--ig_steps", type=int, default=None,
                   help="Integrated-Gradients steps for --attribution captum (default: 30 on ADE, 50 elsewhere)")
    g.add_argument("--ig_batch_size", type=int, default=8,
                   help="Captum internal batch size (interpolation points per backbone pass)")
    g.add_argument("--att_max_images", type=int, default=None,
                   help="cap on the images used for attribution (default: 2000 on ADE, 5000 on ADE task 50, "
                        "else all)")
    g.add_argument("--channels_dir", default="channels", help="folder of the AWT channel masks (see docs/awt.md)")
    g.add_argument("--att_plot", action="store_true", default=False,
                   help="also write a PNG of the sorted channel scores with the selected channels marked")
    g.add_argument("--att_accumulate_classes", action="store_true", default=False,
                   help="per-class masks: accumulate attributions across classes like the released "
                        "attribute_class.py (class k uses classes 1..k); default resets per class")
    g.add_argument("--att_per_class", action="store_true", default=False,
                   help="run.py: use (and compute if missing) one channel mask per new class, as written by "
                        "attribute_class.py, instead of one mask for the union of the new classes")
