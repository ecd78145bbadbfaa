#!/usr/bin/env bash
# SimFormer* (SimFormer's Table 3): SimFormer on a weak-shot setting, then its pseudo-masks of every training image
# (evaluate.py --pseudo_labels), then the retraining on them (recipe row SimFormer_star of scripts/recipes.toml).
#
#   bash scripts/simformer_star.sh DATASET SETTING [extra run.py flags...]     DATASET: coco_stuff_10k | ade
#
# Environment variables as scripts/run_setting.sh (DATA_ROOT, OUTPUT_DIR, NB_GPU, DRY_RUN, ...). Every stage is
# skipped when its output exists (the SimFormer checkpoint and results row, the masks folder
# {OUTPUT_DIR}/pseudo/{DATASET}_{SETTING}, the retrained step), so re-running an interrupted pipeline continues; a
# masks folder is written under another name and renamed when complete.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
DATASET=$1; SETTING=$2; shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CALLER_DIR=$(pwd)
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$CALLER_DIR/$1" ;; esac; }
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
export OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-runs}")
export DATA_ROOT=$(abspath "${DATA_ROOT:-data}")
CHECKPOINT_DIR=$(abspath "${CHECKPOINT_DIR:-$OUTPUT_DIR/checkpoints}")
MASKS=$OUTPUT_DIR/pseudo/${DATASET}_$SETTING

unset NAME  # each stage names its runs after its recipe row: SimFormer, SimFormer_star
bash "$HERE/run_setting.sh" "$DATASET" "$SETTING" SimFormer "$@"

# no cd: relative paths in the environment keep meaning the caller's folder for the last stage too
RECIPE=$(cd "$HERE/.." && "$PYTHON" -m experiment.recipes shell "$DATASET" "$SETTING" SimFormer) || exit 2
eval "$RECIPE"
LABELS=(--dataset "$DATASET" --data_root "$DATA_ROOT" --task "$RECIPE_TASK" --step 0 --name SimFormer
        --checkpoint "$CHECKPOINT_DIR" --backbone "${BACKBONE:-$RECIPE_BACKBONE}" --crop_size "${CROP:-$RECIPE_CROP}"
        "${RECIPE_FLAGS[@]}" --pseudo_labels "$MASKS" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$PYTHON" "$HERE/../evaluate.py" "${LABELS[@]}" | sed 's/ $//'; echo
elif [[ -d $MASKS ]]; then
    echo "simformer_star.sh: $MASKS exists; retraining on it (remove it to label again)" >&2
else
    echo "+ $PYTHON evaluate.py ${LABELS[*]}" >&2
    "$PYTHON" "$HERE/../evaluate.py" "${LABELS[@]}"
fi

bash "$HERE/run_setting.sh" "$DATASET" "$SETTING" SimFormer_star --train_labels "$MASKS" "$@"
