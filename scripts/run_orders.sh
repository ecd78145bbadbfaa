#!/usr/bin/env bash
# Run one method over the ten VOC 15-1 class orders (15-1a ... 15-1j), then one table with mean +- std over them.
#
#   bash scripts/run_orders.sh METHOD_NAME [extra run.py flags...]
#
# METHOD_NAME and the environment variables are those of scripts/run_setting.sh (scripts/README.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
METHOD_NAME=$1; shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for order in a b c d e f g h i j; do
    bash "$HERE/run_setting.sh" voc "15-1$order" "$METHOD_NAME" "$@"
done
suffix=""; if [[ ${DISJOINT:-0} == 1 || ${OVERLAP:-1} == 0 ]]; then suffix=_disjoint; fi
if [[ ${DRY_RUN:-0} != 1 ]]; then
    "${PYTHON:-python}" "$HERE/../report.py" "${RESULTS_DIR:-results}" --dataset voc --task "15-1[a-j]" \
        --name "${NAME:-$METHOD_NAME}$suffix"
fi
