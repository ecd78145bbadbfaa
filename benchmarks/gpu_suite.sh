#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), one log file per part, so that a session on a GPU machine
# collects them in a few calls of at most 10 minutes each:
#
#   bash benchmarks/gpu_suite.sh OUTDIR env tests
#   bash benchmarks/gpu_suite.sh OUTDIR train
#   bash benchmarks/gpu_suite.sh OUTDIR train0 eval
#   bash benchmarks/gpu_suite.sh OUTDIR data attr          # data needs a 512 px dataset: made here if DATA is unset
#   bash benchmarks/gpu_suite.sh OUTDIR methods backbones
#
# (How long each part takes on an H200 is not measured yet; LIMIT caps each command.) Parts: env, tests
# (tests/test_gpu.py), train (training step, batch 24, step 1: fp32, bf16, fp16, bf16+cl, bf16+cl+compile), train0
# (step 0), data (loader, 0-16 workers), eval (confusion matrix + evaluation forward), attr (AWT exact vs Captum; needs
# captum importable), methods (PLOP, RCIL, MiB, DKD and STAR at VOC 15-5 step 1, batch 12, bf16), backbones (ResNet-101 against
# MiT-B2, Swin-T and ConvNeXt-T: step time and peak memory per image at 512 px, batch 8). Each part writes OUTDIR/<part>.txt; a part that fails is reported and the next one still runs;
# exit status 1 if any failed.
# Environment: PYTHON (default python3), DATA (a VOC root for the data part), LIMIT (seconds per command, default 540).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [env tests train train0 data eval attr methods backbones]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(env tests train train0 data eval attr methods backbones)
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
py=${PYTHON:-python3}
limit=${LIMIT:-540}
export PYTHONUNBUFFERED=1
failed=()

step() {  # step PART COMMAND...: run with a time limit, append to OUTDIR/PART.txt
  local part=$1; shift
  echo "\$ $*" >>"$out/$part.txt"
  timeout "$limit" "$@" >>"$out/$part.txt" 2>&1
  local rc=$?
  echo "[exit $rc]" >>"$out/$part.txt"
  return $rc
}

run_part() {
  case $1 in
    env)
      step env nvidia-smi
      step env "$py" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0))" ;;
    tests)
      step tests "$py" -m pytest -q -rs tests/test_gpu.py ;;
    train)
      step train "$py" -m benchmarks.train_step --batch 24 --variants fp32,bf16,fp16,bf16+cl,bf16+cl+compile ;;
    train0)
      step train0 "$py" -m benchmarks.train_step --batch 24 --step 0 --variants fp32,bf16,bf16+cl ;;
    data)
      local root=${DATA:-/tmp/voc512}
      if [ -z "${DATA:-}" ] && [ ! -d "$root" ]; then
        step data "$py" -m dataset.synthetic "$root" --layout voc --size 512 --train 960 --val 40 || return 1
      fi
      step data "$py" -m benchmarks.data_loader --data_root "$root" --crop_size 512 --batch 24 \
        --workers 0,1,2,4,8,16 --batches 30 ;;
    eval)
      step eval "$py" -m benchmarks.evaluation --batch 8 --batches 20 ;;
    methods)
      step methods "$py" -m benchmarks.methods --batch 12 --methods PLOP,RCIL,MiB,DKD,STAR ;;
    backbones)
      step backbones "$py" -m benchmarks.backbones --device cuda --size 512 --batch 8 ;;
    attr)
      if ! "$py" -c "import captum" 2>/dev/null; then
        echo "captum is not importable: carry its wheel (README of the device tool) or pip install captum" \
          >>"$out/attr.txt"
        return 1
      fi
      step attr "$py" benchmarks/attribution.py ;;
    *)
      echo "unknown part '$1' (env tests train train0 data eval attr methods backbones)" >&2
      return 2 ;;
  esac
}

for part in "${parts[@]}"; do
  echo "== $part"
  if run_part "$part"; then
    tail -n 30 "$out/$part.txt"
  else
    failed+=("$part")
    tail -n 60 "$out/$part.txt" 2>/dev/null
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "all parts done (logs in $out)"
