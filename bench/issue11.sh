#!/usr/bin/env bash
# The runs behind the access-control figures (contract section 7): SSE and per-task WebSocket,
# each without and with --auth (a fixed HS256 secret in the gateway, a token of its own per
# connection as ?token=, minted before the connect phase), at the issue-3 scenario shape used
# by the issue-10 tables. Interleaved, RUNS rounds. Results go to bench/results/issue11-*.json;
# `bench/table.py bench/results/issue11-*.json` prints the rows, and the end of this script the
# auth/no-auth ratios per round (the issue: 5000 SSE connects <= 1.5 s with auth, CPU per
# delivery within 5 % of the run without).
#   bench/issue11.sh                  all of it, RUNS=3 times each (about 13 minutes)
#   RUNS=1 ONLY="sse sse-auth" bench/issue11.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
OUT=bench/results
PY=.venv/bin/python
B="--clients 5000 --tasks 500 --rate 2000 --duration 10 --rt 10 --publisher pipeline"

declare -A RUN=(
  [sse]="$B"
  [sse-auth]="$B --auth"
  [ws-task]="$B --transport ws"
  [ws-task-auth]="$B --transport ws --auth"
)
ORDER="sse sse-auth ws-task ws-task-auth"

one() {  # name, run number
  local name=$1 run=$2
  echo "== $name #$run"
  # A failed run (e.g. clients refused by access control) exits 1 and stops the script.
  $PY bench/sse_load.py ${RUN[$name]} --json-out "$OUT/issue11-$name-$run.json" | tail -1
}

# Interleaved, so that a machine that speeds up or slows down touches every configuration,
# and in reverse order every other round (A B B A ...), so that neither mode always goes first.
for run in $(seq 1 "$RUNS"); do
  order=$ORDER
  if ((run % 2 == 0)); then order=$(echo "$ORDER" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for name in $order; do
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] && one "$name" "$run"
  done
done

# Per round: with auth against without, from the files just written.
$PY - "$OUT" "$RUNS" <<'EOF'
import json
import sys
from pathlib import Path

out, runs = Path(sys.argv[1]), int(sys.argv[2])
print("\n| run | connect s (no auth / auth) | gateway CPU us per connection | "
      "CPU us per delivery | auth / no auth |\n|---|---|---|---|---|")
for base in ("sse", "ws-task"):
    for run in range(1, runs + 1):
        paths = [out / f"issue11-{name}-{run}.json" for name in (base, f"{base}-auth")]
        if not all(path.exists() for path in paths):
            continue
        plain, auth = (json.loads(path.read_text()) for path in paths)
        cpu = [d["publish"]["gateway_cpu_us_per_delivery"] for d in (plain, auth)]
        ratio = f"{cpu[1] / cpu[0]:.3f}" if all(cpu) else "n/a"
        print(f"| {base} #{run} "
              f"| {plain['connect']['connect_time_s']} / {auth['connect']['connect_time_s']} "
              f"| {plain['connect']['gateway_cpu_us_per_connection']} / "
              f"{auth['connect']['gateway_cpu_us_per_connection']} "
              f"| {cpu[0]} / {cpu[1]} | {ratio} |")
EOF
