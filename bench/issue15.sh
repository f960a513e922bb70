#!/usr/bin/env bash
# The runs behind bench/README.md's issue-15 figures (REST polling from memory):
#  1. bench/rest_poll.py: taskcast with the poll cache, without it, the naive FastAPI service
#     and a Starlette hello world, one invocation (RUNS_REST rounds of the whole table);
#  2. SSE and per-task WebSocket at the issue-3 scenario shape, this tree against BASE (main
#     before issue 15, a git worktree on PYTHONPATH), interleaved A B B A, RUNS rounds: the
#     streams must not regress (the hub's topics gained a retainer slot, GatewayApp a route).
# Results go to bench/results/issue15-*.json; `bench/table.py bench/results/issue15-[bs]*.json`
# prints the stream rows.
#   bench/issue15.sh                       all of it (about 15 minutes)
#   RUNS=1 ONLY="sse base-sse" bench/issue15.sh
# Needs FastAPI for the naive row: .venv/bin/pip install -c constraints.txt -e '.[bench]'
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
RUNS_REST=${RUNS_REST:-2}
BASE=${BASE:-3bcf008}  # main before issue 15
OUT=bench/results
PY=.venv/bin/python
B="--clients 5000 --tasks 500 --rate 2000 --duration 10 --rt 10 --publisher pipeline"

if [[ -z ${ONLY:-} || " $ONLY " == *" rest "* ]]; then
  echo "== rest_poll"
  $PY bench/rest_poll.py --runs "$RUNS_REST" --json-out "$OUT/issue15-rest-poll.json"
fi

base_tree=$(mktemp -d)
trap 'git worktree remove --force "$base_tree" >/dev/null 2>&1 || true' EXIT
git worktree add -q --detach "$base_tree" "$BASE"

declare -A RUN=(
  [sse]="$B"
  [ws-task]="$B --transport ws"
  [base-sse]="$B"
  [base-ws-task]="$B --transport ws"
)
ORDER="sse base-sse ws-task base-ws-task"

one() {  # name, run number
  local name=$1 run=$2 env=()
  [[ $name == base-* ]] && env=(env "PYTHONPATH=$base_tree/src")
  echo "== $name #$run"
  "${env[@]}" $PY bench/sse_load.py ${RUN[$name]} --json-out "$OUT/issue15-$name-$run.json" \
    | tail -1
}

# Interleaved, in reverse order every other round (A B B A ...), so that a machine that speeds
# up or slows down touches both trees alike.
for run in $(seq 1 "$RUNS"); do
  order=$ORDER
  if ((run % 2 == 0)); then order=$(echo "$ORDER" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for name in $order; do
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] && one "$name" "$run"
  done
done
