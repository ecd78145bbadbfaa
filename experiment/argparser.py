"""Command line: every reference (PLOP/AWT/MiB) flag name, plus the framework's own options.

Core groups live here; loss terms, methods and extensions declare their own flags (``methods.add_method_args``) so
that a method's flags sit next to its code.
"""
from __future__ import annotations

import argparse

from methods import add_extension_args, add_method_args
from models import BACKBONES
from utils.flags import (DEFAULT_PARAM_GROUPS, IGNORED, INVERTED, NOT_IMPLEMENTED, ArgumentParser, date_name,
                         iterations_or_auto, mark, momentum_value, named_path, nonnegative_float, nonnegative_int,
                         path_value,
                         plain_name, positive_float, positive_int)

__all__ = ["ArgumentParser", "IGNORED", "get_argparser"]


def _add_performance(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance and distributed")
    g.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="accepted for torch.distributed.launch compatibility; the rank comes from torchrun's LOCAL_RANK")
    g.add_argument("--random_seed", type=nonnegative_int, default=42, help="seed for torch, numpy, random and data-loader workers")
    g.add_argument("--num_workers", type=nonnegative_int, default=2, help="data-loader worker processes per GPU (reference: 16)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto: cuda if available)")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"],
                   help="mixed precision via torch.amp (default: from --opt_level; off on CPU unless given)")
    g.add_argument("--opt_level", default="O0", choices=["O0", "O1", "O2"],
                   help="apex level of the reference, mapped onto --amp: O0 = off, O1/O2 = fp16 autocast")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster convolutions on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slower start, faster steps)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact reruns, slower)")
    g.add_argument("--threads", type=nonnegative_int, default=0,
                   help="intra-op CPU threads per process; 0 (default): OMP_NUM_THREADS when set, else the CPUs the "
                        "process may use (affinity and cgroup quota) shared by the job's processes on the machine, "
                        "less one per data-loader worker")
    mark(g, resume_free=("local_rank", "num_workers", "device", "compile", "threads"))


def _add_dataset(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--data_root", type=path_value, default="data", help="dataset root (VOC: the PascalVOC12 folder)")
    g.add_argument("--data_roots", type=named_path, nargs="+", default=(), metavar="SOURCE=PATH",
                   help="cross-dataset tasks: the folder of each source dataset (coco-voc: coco=PATH voc=PATH); a "
                        "source not named here is looked for under --data_root (coco/, voc/ or PascalVOC12/)")
    g.add_argument("--dataset", default="voc",
                   help="voc, ade, cityscapes, coco, coco_stuff_10k (class-incremental), cityscapes_domain (PLOP's "
                        "domain-incremental) or coco-voc (WILSON's COCO-to-VOC: step 0 on COCO, step 1 on VOC, both "
                        "tested; sets --backbone wider_resnet38_a2 --output_stride 8 --crop_size 448 "
                        "--crop_size_val 512 unless given, as WILSON's parser forced)")
    g.add_argument("--num_classes", type=int, default=None, help="(ignored: always taken from the dataset)")
    g.add_argument("--dont_predict_bg", action="store_true", help=IGNORED + "background switch, never read")
    g.add_argument("--ignore_test_bg", action="store_true",
                   help=NOT_IMPLEMENTED + "ADE: ignore background pixels in the test metrics")
    g.add_argument("--cache_root", type=path_value, default=None,
                   help="folder of the index caches {cache_root}/{dataset}/{task}[-ov]/*.npy (default: "
                        "$CISS_CACHE_DIR, else $XDG_CACHE_HOME/ciss or ~/.cache/ciss, one sub-folder per --data_root; "
                        "the reference used data/)")
    g.add_argument("--train_augment", default="reference", choices=["reference", "ssul"],
                   help="training augmentation: reference = random-resized crop (area 0.5-2) + flip (MiB/PLOP/AWT); "
                        "ssul = SSUL's scale 0.5-2, random crop padded with 0 (label: background) + flip")
    g.add_argument("--test_unseen", default="background", choices=["background", "ignore"],
                   help="test pixels of classes not seen yet at an intermediate step: background = counted as "
                        "background (MiB/PLOP/AWT), ignore = left out of the metrics (SSUL); the last step has none")
    g.add_argument("--weakly", action="store_true",
                   help="WILSON's weak incremental steps: every step >= 1 trains on image-level labels only (each "
                        "training image yields an all-ignore label map and a multi-hot vector of the step's classes "
                        "present in its full ground truth); step 0, validation and test keep pixel labels")
    g.add_argument("--img_labels", type=path_value, default=None, metavar="FILE",
                   help="with --weakly: image labels from a .npy array (images of the train split x classes 1..N-1 "
                        "in the dataset's ids, as WILSON's voc_1h_labels_train.npy) instead of the label files")
    g.add_argument("--train_labels", type=path_value, default=None, metavar="DIR",
                   help="train on the label PNGs of DIR (train ids, one per training image, named as the image: "
                        "e.g. wsss.py make_masks' masks/) instead of the ground truth; validation and test keep it")
    g.add_argument("--img_labels_from", default="image", choices=["image", "crop"],
                   help="with --weakly: image = a weak step's image labels list the classes of the whole image "
                        "(WILSON; a class cropped out still counts); crop = those still present in the augmented "
                        "crop (SimFormer's mapper: the label file is read for that only)")
    g.add_argument("--weak_old_labels", action="store_true",
                   help="with --weakly: the image labels also name the old classes present (WILSON's Table 5, which "
                        "runs it with its no_mask flag), and WILSON's l_CLS covers every class")
    g.add_argument("--novel_has_mask", action="store_true",
                   help="with a weak-shot task (ws*): the novel classes train on pixel labels too (SimFormer's "
                        "NOVEL_HAS_MASK): on --train_labels pseudo-masks (evaluate.py --pseudo_labels) this is "
                        "SimFormer*'s retraining, on the ground truth the fully supervised oracle")
    g.add_argument("--weak_allow_single", action="store_true",
                   help="with --weakly: run a weak step in which a new class is in every training image (a "
                        "single-class step has no negative image for the image-level loss; WILSON collapses there)")
    mark(g, resume_free=("data_root", "data_roots", "cache_root", "test_unseen"))


def _add_training(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--strict_weights", action="store_false", default=True,
                   help=INVERTED + "passing it loads the previous step / --ckpt NON-strictly (missing and "
                        "unexpected keys allowed); default: strict, except BatchNorm's num_batches_tracked, which is "
                        "never required")
    g.add_argument("--base_weights", action="store_true", help="build only the step-0 classifier")
    g.add_argument("--epochs", type=positive_int, default=30, help="epochs per step")
    g.add_argument("--fix_bn", action="store_true", help="freeze batch-norm statistics and affine parameters")
    g.add_argument("--batch_size", type=positive_int, default=4, help="batch size per process")
    g.add_argument("--grad_accum", type=positive_int, default=1,
                   help="gradient accumulation: effective batch = batch_size x processes x grad_accum")
    g.add_argument("--crop_size", type=positive_int, default=512, help="training crop, and the evaluation centre crop unless --crop_val")
    g.add_argument("--crop_size_val", type=positive_int, default=None,
                   help="evaluation resize + centre crop (WILSON's flag; default: --crop_size)")
    g.add_argument("--buffer_size", type=int, default=0, help=IGNORED + "(no exemplar memory in AWT)")
    g.add_argument("--lr", type=positive_float, nargs="+", default=[0.007], help="learning rate, one per --step or one for all")
    g.add_argument("--lr_old", type=positive_float, default=None, help="old classifiers get lr_old x lr")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd (Nesterov momentum, every reference of the class-incremental family) or adamw "
                        "(MaskFormer and SimFormer: betas 0.9 / 0.999, decoupled weight decay)")
    g.add_argument("--clip_grad", type=nonnegative_float, default=0.0,
                   help="clip the L2 norm of all gradients together to this before each update (detectron2's "
                        "full-model clipping; SimFormer: 0.01); 0: off")
    g.add_argument("--momentum", type=momentum_value, default=0.9, help="SGD momentum (Nesterov)")
    g.add_argument("--weight_decay", type=nonnegative_float, default=1e-4, help="weight decay")
    g.add_argument("--lr_policy", default="poly", choices=["poly", "step", "warm_poly", "warmup"],
                   help="poly (per iteration), step, warm_poly (SSUL, DKD and STAR on ADE20K: poly times a linear "
                        "warm-up from 0.001 x lr over the first --warmup_fraction of the iterations) or warmup "
                        "(WILSON: constant for --pseudo_ep epochs, then poly counted from iteration 0)")
    g.add_argument("--warmup_fraction", type=nonnegative_float, default=0.1,
                   help="warm_poly: the share of the iterations the warm-up lasts (SSUL 0.1; DKD and STAR 0.2, "
                        "which --method DKD/STAR sets on ADE20K)")
    g.add_argument("--lr_min", type=nonnegative_float, default=0.0,
                   help="poly: the lr never goes below this (SSUL: 1e-6; the reference: 0)")
    g.add_argument("--lr_decay_step", type=positive_int, default=5000, help="StepLR step (iterations)")
    g.add_argument("--lr_decay_factor", type=positive_float, default=0.1, help="StepLR factor")
    g.add_argument("--lr_power", type=positive_float, default=0.9, help="poly power")
    g.add_argument("--freeze", action="store_true", help="freeze the backbone; train head and classifiers")
    g.add_argument("--freeze_old", action="store_true", help="freeze old classifiers")
    g.add_argument("--freeze_old_and_FE", action="store_true", help="freeze backbone and old classifiers")
    g.add_argument("--freeze_all_but_new", action="store_true", help="train only the new classifier")
    mark(g, resume_free=("lr",), requires={d: DEFAULT_PARAM_GROUPS for d in ("fix_bn", "lr_old", "freeze", "freeze_old",
                                                                             "freeze_old_and_FE", "freeze_all_but_new")})


def _add_validation(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--test_on_val", action="store_true", help="train on 80%% of train, test on 20%% of val (reference)")
    g.add_argument("--val_on_trainset", action="store_true", help="test set built from the train split")
    g.add_argument("--cross_val", action="store_true", help="validate on a random 20%% of the training set")
    g.add_argument("--select_best_on_val", action="store_true",
                   help="keep the weights of the validation with the best mIoU of the step's new classes instead of "
                        "the last ones (SSUL's model selection; on VOC and ADE20K the validation images ARE the test "
                        "images, so this selects on the test set)")
    g.add_argument("--val_every_iters", type=iterations_or_auto, default=0,
                   help="with --select_best_on_val, also validate every N optimiser updates (auto: SSUL's "
                        "max(100, updates of the step // 100)); 0: at the --val_interval epochs only")
    g.add_argument("--crop_val", action="store_false", default=True,
                   help=INVERTED + "passing it turns cropping OFF: evaluation on full images (batch 1); default: "
                        "centre crops of --crop_size")


def _add_logging(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--logdir", type=path_value, default="./logs",
                   help="run folders {logdir}/{task}-{dataset}/{name}/: TensorBoard events, run.log, config.json, "
                        "command.txt")
    g.add_argument("--name", type=plain_name, default=None,
                   help="experiment name in checkpoint, CSV, mask and log names (default: the method and its "
                        "extensions, e.g. MiB+AWT; the reference's default was Experiment)")
    g.add_argument("--output_dir", type=path_value, default=None,
                   help="one folder for the run's outputs: checkpoints/, results/, logs/ (TensorBoard, run.log, "
                        "config.json, command.txt) and channels/ under it; --checkpoint, --results_dir, --logdir or "
                        "--channels_dir given explicitly keep their own path (default: the reference's folders "
                        "./checkpoints/step, results, ./logs, channels)")
    g.add_argument("--sample_num", type=nonnegative_int, default=0, help="validation samples logged as images")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    g.add_argument("--visualize", action="store_false", default=True,
                   help=INVERTED + "passing it turns TensorBoard OFF; default: on")
    g.add_argument("--print_interval", type=positive_int, default=10, help="iterations between log lines")
    g.add_argument("--val_interval", type=positive_int, default=1, help="epochs between validations")
    g.add_argument("--ckpt_interval", type=positive_int, default=1, help="epochs between resumable checkpoints inside a step")
    g.add_argument("--results_dir", type=path_value, default="results", help="folder of the results CSVs")
    g.add_argument("--channels_dir", type=path_value, default="channels", help="folder of the AWT channel masks (see docs/awt.md)")
    g.add_argument("--date", type=date_name, default="", help="CSV name prefix (default: today's date)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    mark(g, resume_free=("logdir", "output_dir", "sample_num", "debug", "visualize", "print_interval", "val_interval",
                         "ckpt_interval", "results_dir", "channels_dir", "date", "no_progress"))


def _add_model(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default="resnet101", choices=[n for n, f in BACKBONES.items() if f.selectable],
                   help="backbone family: resnet* in the In-Place ABN layout of the reference code, tv_resnet* in "
                        "torchvision's layout with BatchNorm; mit_b0-b5, swin_t/s/b, swin_b_w12, convnext_t/s/b from Hugging "
                        "Face transformers (four stages, stride 32; weights: pretrained/README.md)")
    g.add_argument("--head", default=None,
                   help="the head on the backbone's features: deeplabv3 (the reference's, on the deepest stage), "
                        "segformer (SegFormer's all-MLP decoder over every stage), aspp (torchvision/SSUL's); "
                        "default: the backbone family's (deeplabv3 for the ResNets, segformer for the transformer "
                        "backbones); methods that build their own head (SSUL, RCIL) refuse another")
    g.add_argument("--output_stride", type=positive_int, default=None,
                   help="output stride of the backbone's deepest feature, one its family supports (ResNets: 8, 16 "
                        "or 32; default: the family's, 16 for the ResNets)")
    g.add_argument("--aspp_rates", type=positive_int, nargs=3, default=None, metavar="RATE",
                   help="dilation rates of the deeplabv3 head's three 3x3 branches (default: from the stride of the "
                        "feature it reads: 6 12 18 at 16, 12 24 32 at 8, 3 6 9 at 32); NeST's Swin-B passes 6 12 18 "
                        "on stride-32 features")
    g.add_argument("--mask_queries", type=positive_int, default=None,
                   help="--head maskformer: learnt queries (default 100, SimFormer's); fewer make small CPU runs "
                        "affordable")
    g.add_argument("--mask_layers", type=positive_int, default=None,
                   help="--head maskformer: transformer decoder layers (default 6, SimFormer's; each one is "
                        "deeply supervised)")
    g.add_argument("--no_pretrained", action="store_true", help="do not load ImageNet weights from pretrained/")
    g.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "std"],
                   help="normalisation + activation of the resnet* backbones and the deeplabv3 head (tv_resnet* "
                        "backbones always use BatchNorm + ReLU)")
    g.add_argument("--fusion-mode", dest="fusion_mode", default="mean", help=IGNORED + "multi-scale fusion, never read")
    g.add_argument("--pooling", type=positive_int, default=32, help="ASPP image-pooling window in evaluation")
    g.add_argument("--code_directory", type=path_value, default=".", help="root of pretrained/")
    g.add_argument("--disable_background", action="store_true",
                   help=NOT_IMPLEMENTED + "zero the background logit in evaluation (PLOP's Cityscapes-domain "
                        "leftover)")
    mark(g, resume_free=("code_directory",))


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("test and checkpoint")
    g.add_argument("--test", action="store_true", help="skip training, test the step's checkpoint")
    g.add_argument("--ckpt", type=path_value, default=None, help="checkpoint of the current step to resume from")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted step from its last in-step checkpoint (also automatic)")
    g.add_argument("--no_auto_resume", action="store_true", help="ignore in-step checkpoints and start the step over")
    g.add_argument("--overwrite", action="store_true", help="retrain a step whose final checkpoint already exists")
    g.add_argument("--step_ckpt", type=path_value, default=None, help="explicit previous-step checkpoint (first step of the call)")
    g.add_argument("--checkpoint", type=path_value, default="./checkpoints/step", help="checkpoint folder")
    mark(g, resume_free=("test", "ckpt", "resume", "no_auto_resume", "overwrite", "step_ckpt", "checkpoint"))


def _add_protocol(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("incremental protocol")
    g.add_argument("--task", default="19-1", help="class split, e.g. 15-1, 100-50, 14-1")
    g.add_argument("--step", type=nonnegative_int, nargs="+", default=[0], help="step(s) to run, in order")
    g.add_argument("--no_mask", action="store_true", help=NOT_IMPLEMENTED + "keep old-class labels in training; with --weakly (WILSON's meaning): "
                                                "= --weak_old_labels")
    g.add_argument("--data_masking", default="current", choices=["current", "current+old", "all", "new"],
                   help="training label masking")
    g.add_argument("--overlap", action="store_true", help="overlapped protocol (default: disjoint)")
    mark(g, resume_free=("step",))


USAGE = "%(prog)s --dataset D --data_root PATH --task T --step N [N ...] [--method M] [flag value ...]"
DESCRIPTION = ("Train and test the incremental steps of a class-incremental semantic segmentation task "
               "(DeepLab-v3; AWT, MiB, PLOP and the other methods; reference flag names). Flags by group below, "
               "defaults in parentheses; the reference flags that are ignored or not implemented are listed last.")


def get_argparser(add_help: bool = True, *, usage: str = USAGE, description: str = DESCRIPTION
                  ) -> argparse.ArgumentParser:
    """The full parser: core groups, then the flags of every loss term, method and extension (attribute.py and
    evaluate.py reuse it with their own usage and description)."""
    parser = ArgumentParser(add_help=add_help, usage=usage, description=description)
    for add in (_add_performance, _add_dataset, _add_training, _add_validation, _add_logging, _add_model,
                _add_checkpoint, _add_protocol):
        add(parser)
    add_method_args(parser)
    add_extension_args(parser)
    return parser
