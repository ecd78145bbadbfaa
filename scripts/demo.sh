#!/usr/bin/env bash
# The main job on the built-in synthetic dataset: MiB against MiB+AWT on Pascal-VOC 15-1 (shared step 0).
#
#   bash scripts/demo.sh            # CPU, a few minutes; writes demo_out/
#
# It creates the synthetic VOC dataset when missing, trains step 0 once, runs the five incremental steps with MiB
# and with MiB+AWT (--att 25 --mask_att, the mask computed in-process), then prints old/new/all per method (the
# layout of the AWT paper's Table 7) and saves a plot of mIoU per step. The model and schedule are scaled down
# (ResNet-18 from scratch, 64 px crops, few epochs, a higher incremental lr) so it fits on two CPU cores.
# Environment overrides: PYTHON, DATA_ROOT, OUT, EPOCHS0, EPOCHS, LR0, LR, WORKERS, EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DATA="${DATA_ROOT:-data/PascalVOC12_synthetic}"
OUT="${OUT:-demo_out}"
EPOCHS0="${EPOCHS0:-30}"
EPOCHS="${EPOCHS:-8}"
LR0="${LR0:-0.02}"
LR="${LR:-0.01}"
WORKERS="${WORKERS:-1}"

if [ ! -d "$DATA" ]; then
    "$PY" -m dataset.synthetic "$DATA" --layout voc
fi
if [ -e "$OUT" ] && [ ! -e "$OUT/.demo_output" ]; then
    echo "error: $OUT exists and was not made by the demo; set OUT to another folder" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.demo_output"

COMMON=(--dataset voc --data_root "$DATA" --task 15-1 --overlap --backbone resnet18 --no_pretrained
        --norm_act abn --crop_size 64 --batch_size 16 --num_workers "$WORKERS" --val_interval 1000
        --checkpoint "$OUT/checkpoints" --results_dir "$OUT/results" --logdir "$OUT/logs"
        --cache_root "$OUT/cache" --channels_dir "$OUT/channels" --date demo ${EXTRA:-})
STEP0="$OUT/checkpoints/15-1-voc_MiB_0.pth"

echo "== step 0 (shared by both methods)"
"$PY" run.py "${COMMON[@]}" --method MiB --name MiB --step 0 --lr "$LR0" --epochs "$EPOCHS0"
echo "== MiB, steps 1-5"
"$PY" run.py "${COMMON[@]}" --method MiB --name MiB --step 1 2 3 4 5 --lr "$LR" --epochs "$EPOCHS"
echo "== MiB+AWT, steps 1-5"
"$PY" run.py "${COMMON[@]}" --method MiB --name MiB+AWT --test --step 0 --ckpt "$STEP0"
"$PY" run.py "${COMMON[@]}" --method MiB --att 25 --mask_att --name MiB+AWT --step 1 2 3 4 5 --lr "$LR" \
    --epochs "$EPOCHS" --step_ckpt "$STEP0"

echo "== results (mIoU %, synthetic VOC 15-1, last step)"
"$PY" report.py "$OUT/results" --per-step --plot "$OUT/miou_per_step.png" --output "$OUT/report.md"
echo "plot: $OUT/miou_per_step.png   report: $OUT/report.md"
