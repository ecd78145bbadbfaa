#!/usr/bin/env bash
# SSUL against MiB on the built-in synthetic dataset (Pascal-VOC 15-1), the sibling of scripts/demo.sh.
#
#   bash scripts/demo_ssul.sh        # CPU, about 4-5 minutes on two cores (2 for SSUL once demo.sh has run)
#
# Runs scripts/demo.sh first (MiB and MiB+AWT; finished steps are skipped, so nothing is trained twice), then SSUL
# on the same data (ResNet-18 in torchvision's layout from scratch, 64 px, 9 epochs at step 0 and 4 per later step;
# the synthetic data carries saliency maps like SSUL's VOC release), then one table and one plot for all three.
# Interrupted? Run it again. RESTART=1 deletes demo_ssul_out/ first. Environment overrides: PYTHON, DATA_ROOT,
# OUT (the main demo's folder), SSUL_OUT, EPOCHS0, EPOCHS, SSUL_LR0, SSUL_LR, WORKERS, RESTART, EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DATA="${DATA_ROOT:-data/PascalVOC12_demo}"
MAIN_OUT="${OUT:-demo_out}"
SSUL_OUT="${SSUL_OUT:-demo_ssul_out}"
EPOCHS0="${EPOCHS0:-9}"
EPOCHS="${EPOCHS:-4}"
SSUL_LR0="${SSUL_LR0:-0.05}"  # step 0: heads at this lr, the backbone at a tenth (SSUL's rule)
SSUL_LR="${SSUL_LR:-0.01}"    # later steps: SSUL's VOC lr
# 64 px synthetic images load in the main process in no time; no worker leaves both CPUs to the training threads
WORKERS="${WORKERS:-0}"
START=$SECONDS

if [ -e "$SSUL_OUT" ] && [ ! -e "$SSUL_OUT/.demo_output" ]; then
    echo "error: $SSUL_OUT exists and was not made by the demo; set SSUL_OUT to another folder" >&2
    exit 2
fi
if [ "${RESTART:-0}" = 1 ]; then
    rm -rf "$SSUL_OUT"
fi

echo "== [1/3, $((SECONDS - START))s] MiB and MiB+AWT (scripts/demo.sh; steps already done are skipped)"
DATA_ROOT="$DATA" OUT="$MAIN_OUT" RESTART=0 bash scripts/demo.sh
mkdir -p "$SSUL_OUT"
touch "$SSUL_OUT/.demo_output"

echo "== [2/3, $((SECONDS - START))s] SSUL, step 0 then steps 1-5"
COMMON=(--dataset voc --data_root "$DATA" --task 15-1 --overlap --backbone resnet18 --no_pretrained
        --crop_size 64 --batch_size 16 --num_workers "$WORKERS" --val_interval 1000 --method SSUL --name SSUL
        --output_dir "$SSUL_OUT" --cache_root "$MAIN_OUT/cache" --date demo ${EXTRA:-})
"$PY" run.py "${COMMON[@]}" --step 0 --lr "$SSUL_LR0" --epochs "$EPOCHS0"
"$PY" run.py "${COMMON[@]}" --step 1 2 3 4 5 --lr "$SSUL_LR" --epochs "$EPOCHS"

echo "== [3/3, $((SECONDS - START))s] results (mIoU %, synthetic VOC 15-1, last step)"
"$PY" report.py "$MAIN_OUT/results" "$SSUL_OUT/results" --per-step --plot "$SSUL_OUT/miou_per_step.png" --full-scale \
    --output "$SSUL_OUT/report.md"
echo "plot: $SSUL_OUT/miou_per_step.png   report: $SSUL_OUT/report.md"
echo "demo finished in $((SECONDS - START))s"
