"""Markdown rows from `sse_load.py --json-out` files, for bench/README.md.

    .venv/bin/python bench/table.py bench/results/issue10-*.json

One row per file: publish runs give connect time, RSS per idle connection, CPU per delivery
(and with the closes after the terminal state), latency, terminal-state p99 and lost terminal
states; churn runs give RSS after each round and the growth from round 1 to the last. The first
column is the file name without `.json`, so name the files after what they measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def publish_row(name: str, data: dict[str, Any]) -> str:
    connect, memory, publish = data["connect"], data["memory"], data["publish"]
    latency, terminal = publish["latency_ms"], publish["terminal_latency_ms"]
    return (f"| {name} | {connect['connect_time_s']:.2f} s "
            f"| {memory['rss_per_idle_connection_kib']:.2f} KiB "
            f"| {publish['gateway_cpu_us_per_delivery']:.1f} µs "
            f"({publish.get('gateway_cpu_us_per_delivery_incl_close') or 0:.1f}) "
            f"| {latency['p50']:.1f} / {latency['p99']:.1f} / {latency['max']:.1f} ms "
            f"| {terminal['p99']:.1f} ms | {publish['deliveries_per_s']:,.0f} "
            f"| {publish['lost_terminal_states']} |")


def churn_row(name: str, data: dict[str, Any]) -> str:
    churn = data["churn"]
    rounds = churn["rss_after_round_kib"]
    return (f"| {name} | {churn['connections_per_round']} × {churn['rounds']} "
            f"| {rounds[0] / 1024:.1f} → {rounds[-1] / 1024:.1f} MiB "
            f"| {churn['rss_growth_round_1_to_last_pct']:+.1f} % "
            f"| {'yes' if churn['rss_round_last_within_10pct_of_round_1'] else 'no'} "
            f"| {' '.join(f'{value / 1024:.1f}' for value in rounds)} |")


PUBLISH_HEAD = ("| run | connect | RSS / idle connection | CPU per delivery (incl. closes) "
                "| latency p50 / p99 / max | terminal p99 | deliveries/s | lost |\n"
                "|---|---|---|---|---|---|---|---|")
CHURN_HEAD = ("| run | connections × rounds | RSS round 1 → last | growth | within 10 % "
              "| RSS after each round (MiB) |\n|---|---|---|---|---|---|")


def main(paths: list[str]) -> None:
    publish, churn = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = Path(path).stem
        if "churn" in data:
            churn.append(churn_row(name, data))
        elif "publish" in data:
            publish.append(publish_row(name, data))
    if publish:
        print(PUBLISH_HEAD, *publish, sep="\n")
    if churn:
        print(CHURN_HEAD, *churn, sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
