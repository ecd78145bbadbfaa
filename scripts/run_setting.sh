#!/usr/bin/env bash
# Run every step of one setting with the recipe of scripts/recipes.toml (the published script it mirrors), then print
# its table.
#
#   bash scripts/run_setting.sh DATASET SETTING METHOD_NAME [extra run.py flags...]
#
#   DATASET      voc | ade | cityscapes | cityscapes_domain | coco-voc
#   SETTING      a setting of the recipe table (15-1, 15-1a, 100-50, 50-50, 14-1, 11-1, ...)
#   METHOD_NAME  FT LWF LWF-MC ILT EWC RW PI MiB MiB_base MiB_AWT PLOP PLOP_AWT SSUL SSUL-M SSUL_AWT RCIL RCIL_AWT
#                ... (those with a recipe for the setting: scripts/recipes.toml)
#
# One run.py call per step (step 0 included). A step whose final checkpoint
# {CHECKPOINT_DIR}/{TASK}-{DATASET}_{NAME}_{step}.pth exists is skipped (REDO=1 runs it again), so re-running an
# interrupted setting continues where it stopped; run.py itself resumes inside an interrupted step.
# Environment variables override the recipe (defaults in brackets; scripts/README.md):
#   DATA_ROOT [data]  NB_GPU [1]  BATCH_SIZE [recipe batch/(NB_GPU*GRAD_ACCUM)]  GRAD_ACCUM [1]  LR0, LR [recipe]
#   EPOCHS0, EPOCHS [recipe; EPOCHS alone sets both]  CROP [recipe: 512, SSUL 513]  BACKBONE [recipe: resnet101;
#   COCO-to-VOC wider_resnet38_a2]  OVERLAP [recipe: 1; coco-voc 0] / DISJOINT [0]
#   ATT [recipe's --att]  AMP_LEVEL [O1]  NAME [METHOD_NAME, +_disjoint]  OUTPUT_DIR [runs]: every output under it
#   (CHECKPOINT_DIR [OUTPUT_DIR/checkpoints], RESULTS_DIR [OUTPUT_DIR/results], LOG_DIR [OUTPUT_DIR/logs],
#   CHANNELS_DIR [OUTPUT_DIR/channels] move one of them)  DATE [see README]  NUM_WORKERS [run.py default]  STEP0_FROM [unset]  REDO [0]
#   DRY_RUN [0]  EXTRA [""]  PYTHON [python]  LAUNCHER [$PYTHON -m torch.distributed.run --standalone ...]
set -euo pipefail

die() { echo "run_setting.sh: error: $*" >&2; exit 2; }

if [[ $# -lt 3 ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
DATASET=$1; SETTING=$2; METHOD_NAME=$3; shift 3

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CALLER_DIR=$(pwd)
# Paths given relative to where the script was called from keep meaning that after the cd to the repository root.
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$CALLER_DIR/$1" ;; esac; }

PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
NB_GPU=${NB_GPU:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}
[[ $NB_GPU =~ ^[1-9][0-9]*$ ]] || die "NB_GPU must be a positive integer, got '$NB_GPU'"
[[ $GRAD_ACCUM =~ ^[1-9][0-9]*$ ]] || die "GRAD_ACCUM must be a positive integer, got '$GRAD_ACCUM'"

cd "$ROOT"
# The recipe: experiment/recipes.py reads scripts/recipes.toml (no torch import: fast dry runs).
RECIPE=$("$PYTHON" -m experiment.recipes shell "$DATASET" "$SETTING" "$METHOD_NAME") || exit 2
eval "$RECIPE"
TASK=$RECIPE_TASK
NSTEPS=$RECIPE_STEPS

EFFECTIVE_BATCH=$RECIPE_BATCH
if [[ -z ${BATCH_SIZE:-} ]]; then
    (( EFFECTIVE_BATCH % (NB_GPU * GRAD_ACCUM) == 0 )) || \
        die "the recipe's batch $EFFECTIVE_BATCH is not divisible by NB_GPU*GRAD_ACCUM=$((NB_GPU * GRAD_ACCUM)); set BATCH_SIZE (per process) explicitly"
    BATCH_SIZE=$(( EFFECTIVE_BATCH / (NB_GPU * GRAD_ACCUM) ))
fi
if (( BATCH_SIZE * NB_GPU * GRAD_ACCUM != EFFECTIVE_BATCH )); then
    echo "run_setting.sh: warning: effective batch $((BATCH_SIZE * NB_GPU * GRAD_ACCUM)) (BATCH_SIZE x NB_GPU x GRAD_ACCUM)" \
         "differs from the recipe's $EFFECTIVE_BATCH; its learning rates assume $EFFECTIVE_BATCH" >&2
fi
echo "run_setting.sh: $DATASET $SETTING $METHOD_NAME follows recipe $RECIPE_ID: $RECIPE_SOURCE${RECIPE_NOTE:+ ($RECIPE_NOTE)}" >&2

EPOCHS0=${EPOCHS0:-${EPOCHS:-$RECIPE_EPOCHS0}}
EPOCHS=${EPOCHS:-$RECIPE_EPOCHS}
CROP=${CROP:-$RECIPE_CROP}
BACKBONE=${BACKBONE:-$RECIPE_BACKBONE}
LR0=${LR0:-$RECIPE_LR0}
LR=${LR:-$RECIPE_LR}
AMP_LEVEL=${AMP_LEVEL:-O1}
METHOD_FLAGS=("${RECIPE_FLAGS[@]}")
if [[ -n ${ATT:-} ]]; then METHOD_FLAGS+=(--att "$ATT"); fi

OVERLAP=${OVERLAP:-$RECIPE_OVERLAP}
if [[ ${DISJOINT:-0} == 1 ]]; then OVERLAP=0; fi
if [[ $OVERLAP == 1 && " $RECIPE_PROTOCOLS " != *" overlap "* ]]; then
    die "$DATASET $SETTING has the $RECIPE_PROTOCOLS protocol only; unset OVERLAP"
fi
PROTOCOL_FLAGS=()
SUFFIX=""
if [[ $OVERLAP == 1 ]]; then PROTOCOL_FLAGS=(--overlap); else SUFFIX="_disjoint"; fi

NAME=${NAME:-$METHOD_NAME$SUFFIX}
OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-runs}")
CHECKPOINT_DIR=$(abspath "${CHECKPOINT_DIR:-$OUTPUT_DIR/checkpoints}")
RESULTS_DIR=$(abspath "${RESULTS_DIR:-$OUTPUT_DIR/results}")
LOG_DIR=$(abspath "${LOG_DIR:-$OUTPUT_DIR/logs}")
CHANNELS_DIR=$(abspath "${CHANNELS_DIR:-$OUTPUT_DIR/channels}")
DATA_ROOT=$(abspath "${DATA_ROOT:-data}")
REDO=${REDO:-0}
DRY_RUN=${DRY_RUN:-0}

ckpt_path() { printf '%s/%s-%s_%s_%s.pth' "$CHECKPOINT_DIR" "$TASK" "$DATASET" "$NAME" "$1"; }

# One CSV per reproduction: the date prefix is chosen when step 0 first runs and kept in a small file next to the
# checkpoints, so a setting resumed on another day keeps appending to the same CSV. REDO=1 starts a new one.
DATE_FILE="$CHECKPOINT_DIR/$TASK-${DATASET}_$NAME.date"
if [[ -z ${DATE:-} ]]; then
    if [[ $REDO != 1 && -s $DATE_FILE ]]; then DATE=$(<"$DATE_FILE"); else DATE=$(date +%Y-%m-%d); fi
fi
if [[ $DRY_RUN != 1 ]]; then mkdir -p "$CHECKPOINT_DIR"; printf '%s\n' "$DATE" >"$DATE_FILE"; fi

if [[ -n ${LAUNCHER:-} ]]; then
    read -r -a LAUNCH <<<"$LAUNCHER"
else
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone "--nproc_per_node=$NB_GPU")
fi
read -r -a EXTRA_FLAGS <<<"${EXTRA:-}"
WORKER_FLAGS=()
if [[ -n ${NUM_WORKERS:-} ]]; then WORKER_FLAGS=(--num_workers "$NUM_WORKERS"); fi

run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'; echo
    else
        echo "+ $*" >&2
        "$@"
    fi
}

FIRST=0
if [[ -n ${STEP0_FROM:-} ]]; then
    # Share a finished step 0 between methods whose step 0 is plain cross-entropy (every method but EWC/RW/PI).
    STEP0_FROM=$(abspath "$STEP0_FROM")
    [[ -f $STEP0_FROM || $DRY_RUN == 1 ]] || die "STEP0_FROM=$STEP0_FROM does not exist"
    case " ${METHOD_FLAGS[*]} " in *" --method EWC "*|*" --method RW "*|*" --method PI "*)
        die "STEP0_FROM cannot be used with $METHOD_NAME (its step 0 stores regularizer state)" ;; esac
    FIRST=1
fi

CSV="$RESULTS_DIR/${DATE}_${DATASET}_${TASK}_${NAME}.csv"
for (( step = FIRST; step < NSTEPS; step++ )); do
    final=$(ckpt_path "$step")
    STATE_FLAGS=()
    if [[ $REDO == 1 ]]; then
        STATE_FLAGS=(--overwrite --no_auto_resume)  # retrain from scratch even if the step was done or started
    elif [[ -f $final ]]; then
        if [[ -f $CSV ]] && grep -q "^$step," "$CSV"; then
            echo "run_setting.sh: step $step of $DATASET $TASK $NAME already done ($final exists; REDO=1 to run it again)" >&2
            continue
        fi
        # Trained but never tested (interrupted after the checkpoint was written): only test it.
        echo "run_setting.sh: step $step has a checkpoint but no row in $CSV: testing it" >&2
        STATE_FLAGS=(--test)
    fi
    if (( step == 0 )); then lr=$LR0; epochs=$EPOCHS0; STEP_FLAGS=(${RECIPE_FIRST_FLAGS[@]+"${RECIPE_FIRST_FLAGS[@]}"}); else lr=$LR; epochs=$EPOCHS; STEP_FLAGS=(${RECIPE_LATER_FLAGS[@]+"${RECIPE_LATER_FLAGS[@]}"}); fi
    PREV_FLAGS=()
    if (( step == 1 )) && [[ -n ${STEP0_FROM:-} ]]; then PREV_FLAGS=(--step_ckpt "$STEP0_FROM"); fi
    run "${LAUNCH[@]}" run.py \
        --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --step "$step" --lr "$lr" \
        --epochs "$epochs" --batch_size "$BATCH_SIZE" --grad_accum "$GRAD_ACCUM" --crop_size "$CROP" \
        --backbone "$BACKBONE" --opt_level "$AMP_LEVEL" \
        ${PROTOCOL_FLAGS[@]+"${PROTOCOL_FLAGS[@]}"} \
        ${METHOD_FLAGS[@]+"${METHOD_FLAGS[@]}"} \
        ${STEP_FLAGS[@]+"${STEP_FLAGS[@]}"} \
        --name "$NAME" --output_dir "$OUTPUT_DIR" --checkpoint "$CHECKPOINT_DIR" --results_dir "$RESULTS_DIR" \
        --logdir "$LOG_DIR" --channels_dir "$CHANNELS_DIR" --date "$DATE" \
        ${WORKER_FLAGS[@]+"${WORKER_FLAGS[@]}"} \
        ${PREV_FLAGS[@]+"${PREV_FLAGS[@]}"} \
        ${STATE_FLAGS[@]+"${STATE_FLAGS[@]}"} \
        ${1+"$@"} \
        ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}
done

if [[ $DRY_RUN == 1 || -f $CSV ]]; then
    run "$PYTHON" report.py "$CSV"
else
    echo "run_setting.sh: no results file $CSV (nothing was run and no earlier CSV has this date); see results/" >&2
fi
