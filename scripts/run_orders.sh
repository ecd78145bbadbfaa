#!/usr/bin/env bash
# Run one method over the VOC 15-1 class orders, then one table with mean +- std over them.
#
#   bash scripts/run_orders.sh METHOD_NAME [extra run.py flags...]
#
# ORDERS=paper (default): the AWT paper's ten, 15-1 and 15-1a,b,c,e...j (its supplementary leaves 15-1d out);
# ORDERS=all: all eleven. Each order runs with its own recipe (scripts/recipes.toml). METHOD_NAME and the other
# environment variables are those of scripts/run_setting.sh (scripts/README.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
METHOD_NAME=$1; shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ORDERS=${ORDERS:-paper}
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LIST=$(cd "$HERE/.." && "$PYTHON" -c 'import sys
from dataset.tasks import ORDER_SETS
if sys.argv[1] not in ORDER_SETS:
    sys.exit("run_orders.sh: error: ORDERS=%r; use one of %s" % (sys.argv[1], " or ".join(ORDER_SETS)))
print(" ".join(ORDER_SETS[sys.argv[1]]))' "$ORDERS") || exit 2
echo "run_orders.sh: $METHOD_NAME over the order set '$ORDERS': $LIST" >&2
for order in $LIST; do
    bash "$HERE/run_setting.sh" voc "$order" "$METHOD_NAME" "$@"
done
suffix=""; if [[ ${DISJOINT:-0} == 1 || ${OVERLAP:-1} == 0 ]]; then suffix=_disjoint; fi
if [[ ${DRY_RUN:-0} != 1 ]]; then
    "$PYTHON" "$HERE/../report.py" "${RESULTS_DIR:-${OUTPUT_DIR:-runs}/results}" --dataset voc --task 15-1 "15-1[a-j]" \
        --name "${NAME:-$METHOD_NAME}$suffix" --orders "$ORDERS"
fi
