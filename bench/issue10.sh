#!/usr/bin/env bash
# The runs behind bench/README.md's issue-10 tables: every transport at the issue-3 scenario
# shape, the raw ceiling server alongside, the code before the change (BASE, a git revision)
# in the same conditions, and the churn rounds. Results go to bench/results/issue10-*.json;
# `bench/table.py bench/results/issue10-*.json` prints the tables.
#   bench/issue10.sh                  all of it, RUNS=3 times each (about 40 minutes)
#   RUNS=1 ONLY="ws-task sse" bench/issue10.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
BASE=${BASE:-7f5793b}  # main before issue 10
OUT=bench/results
PY=.venv/bin/python
B="--clients 5000 --tasks 500 --rate 2000 --duration 10 --rt 10 --publisher pipeline"
C="--churn 10 --clients 2000 --tasks 200 --hold 1 --rt 10"

base_tree=$(mktemp -d)
trap 'git worktree remove --force "$base_tree" >/dev/null 2>&1 || true' EXIT
git worktree add -q --detach "$base_tree" "$BASE"

declare -A RUN=(
  [sse]="$B"
  [ws-task]="$B --transport ws"
  [ws-many-1]="$B --transport ws --ws-endpoint many"
  [ws-many-10]="$B --transport ws --ws-endpoint many --tasks-per-socket 10"
  [raw-sse]="$B --server raw"
  [raw-ws-task]="$B --server raw --transport ws"
  [raw-ws-many-1]="$B --server raw --transport ws --ws-endpoint many"
  [raw-ws-many-10]="$B --server raw --transport ws --ws-endpoint many --tasks-per-socket 10"
  [base-sse]="$B"
  [base-ws-task]="$B --transport ws"
  [base-ws-many-1]="$B --transport ws --ws-endpoint many"
  [base-ws-many-10]="$B --transport ws --ws-endpoint many --tasks-per-socket 10"
  [churn-sse]="$C"
  [churn-ws-task]="$C --transport ws"
  [churn-ws-many]="$C --transport ws --ws-endpoint many"
  [churn-base-sse]="$C"
  [churn-base-ws-task]="$C --transport ws"
)
ORDER="sse ws-task ws-many-1 ws-many-10 raw-sse raw-ws-task raw-ws-many-1 raw-ws-many-10
base-sse base-ws-task base-ws-many-1 base-ws-many-10"
CHURN="churn-sse churn-ws-task churn-ws-many churn-base-sse churn-base-ws-task"

one() {  # name, run number
  local name=$1 run=$2 env=()
  [[ $name == *base-* ]] && env=(env "PYTHONPATH=$base_tree/src")
  echo "== $name #$run"
  "${env[@]}" $PY bench/sse_load.py ${RUN[$name]} --json-out "$OUT/issue10-$name-$run.json" | tail -1
}

# Interleaved, so that a machine that speeds up or slows down touches every configuration.
for run in $(seq 1 "$RUNS"); do
  for name in $ORDER; do
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] && one "$name" "$run"
  done
done
for name in $CHURN; do
  [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] && one "$name" 1
done
