#!/usr/bin/env bash
# The main job on the built-in synthetic dataset: MiB against MiB+AWT on Pascal-VOC 15-1 (shared step 0).
#
#   bash scripts/demo.sh            # CPU, about 3 minutes on two cores; writes demo_out/
#
# It creates the synthetic VOC dataset when missing, trains step 0 once, runs the five incremental steps with MiB
# and with MiB+AWT (--att 25 --mask_att, the mask computed in-process), then prints old/new/all per method (the
# layout of the AWT paper's Table 7) and saves a plot of mIoU per step. The model and schedule are scaled down
# (ResNet-18 from scratch, 64 px images, 9 epochs at step 0 and 4 per later step) so it fits on two CPU cores.
# Interrupted (Ctrl-C, a closed laptop)? Run it again: finished steps are skipped and the current one resumes.
# RESTART=1 deletes demo_out/ first. Environment overrides: PYTHON, DATA_ROOT, OUT, EPOCHS0, EPOCHS, LR0, LR,
# WORKERS, RESTART, EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DATA="${DATA_ROOT:-data/PascalVOC12_demo}"
OUT="${OUT:-demo_out}"
EPOCHS0="${EPOCHS0:-9}"
EPOCHS="${EPOCHS:-4}"
LR0="${LR0:-0.05}"
LR="${LR:-0.01}"
# 64 px synthetic images load in the main process in no time; no worker leaves both CPUs to the training threads
WORKERS="${WORKERS:-0}"
START=$SECONDS

stage() { echo "== [$1/4, $((SECONDS - START))s] $2"; }

if [ ! -d "$DATA" ]; then
    "$PY" -m dataset.synthetic "$DATA" --layout voc --size 64 --train 400 --val 100
fi
if [ -e "$OUT" ] && [ ! -e "$OUT/.demo_output" ]; then
    echo "error: $OUT exists and was not made by the demo; set OUT to another folder" >&2
    exit 2
fi
if [ "${RESTART:-0}" = 1 ]; then
    rm -rf "$OUT"
fi
mkdir -p "$OUT"
touch "$OUT/.demo_output"

COMMON=(--dataset voc --data_root "$DATA" --task 15-1 --overlap --backbone resnet18 --no_pretrained
        --norm_act abn --crop_size 64 --batch_size 16 --num_workers "$WORKERS" --val_interval 1000
        --output_dir "$OUT" --cache_root "$OUT/cache" --date demo ${EXTRA:-})
STEP0="$OUT/checkpoints/15-1-voc_MiB_0.pth"
AWT_CSV="$OUT/results/demo_voc_15-1_MiB+AWT.csv"

stage 1 "step 0, shared by both methods ($EPOCHS0 epochs; about half of the demo)"
"$PY" run.py "${COMMON[@]}" --method MiB --name MiB --step 0 --lr "$LR0" --epochs "$EPOCHS0"
stage 2 "MiB, steps 1-5 ($EPOCHS epochs each)"
"$PY" run.py "${COMMON[@]}" --method MiB --name MiB --step 1 2 3 4 5 --lr "$LR" --epochs "$EPOCHS"
stage 3 "MiB+AWT, steps 1-5 ($EPOCHS epochs each, AWT channel masks computed first)"
if [ ! -f "$AWT_CSV" ] || ! grep -q "^0," "$AWT_CSV"; then  # step 0's row, tested from the shared checkpoint
    "$PY" run.py "${COMMON[@]}" --method MiB --name MiB+AWT --test --step 0 --ckpt "$STEP0"
fi
"$PY" run.py "${COMMON[@]}" --method MiB --att 25 --mask_att --name MiB+AWT --step 1 2 3 4 5 --lr "$LR" \
    --epochs "$EPOCHS" --step_ckpt "$STEP0"

stage 4 "results (mIoU %, synthetic VOC 15-1, last step)"
"$PY" report.py "$OUT/results" --per-step --plot "$OUT/miou_per_step.png" --full-scale --output "$OUT/report.md"
echo "plot: $OUT/miou_per_step.png   report: $OUT/report.md   logs: $OUT/logs/15-1-voc/*/run.log"
echo "demo finished in $((SECONDS - START))s"
