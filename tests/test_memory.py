"""Memory that comes back: finished connections leave no reference cycles behind.

`taskcast serve` sets high collector thresholds (cli._tune_gc) because collections of a heap
holding thousands of connections cost much of the CPU per delivery; so anything a connection
leaves in a reference cycle waits for a full collection that almost never comes, and a
long-running gateway grows by the cycles of every connection it ever had. tests/gc_probe.py
runs a gateway under uvloop, as `taskcast serve` does, with the collector paused, and counts
what one collection finds after rounds of SSE streams and WebSockets ended every way they can
end (the client leaves, the task finishes, the record vanishes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent / "gc_probe.py"
CLIENTS = 200
# "Almost nothing": a stray object now and then is not a leak per connection.
ALLOWED_PER_ROUND = 10


def test_finished_streams_and_sockets_leave_no_cyclic_garbage() -> None:
    result = subprocess.run(
        [sys.executable, str(PROBE), "--clients", str(CLIENTS)],
        capture_output=True, text=True, timeout=240, cwd=PROBE.parent.parent, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["kind"], r["end"]) for r in rounds} == {
        (kind, end) for kind in ("sse", "ws-task", "ws-many")
        for end in ("client", "terminal", "missing")}
    for measured in rounds:
        assert measured["connections"] == CLIENTS
        assert measured["collected"] <= ALLOWED_PER_ROUND, measured
