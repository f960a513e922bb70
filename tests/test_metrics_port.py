"""TASKCAST_METRICS_PORT (issue 12, item 6): /metrics leaves the public port for a listener of
its own (loopback by default), served by prometheus_client, and closes with the gateway."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from taskcast.settings import Settings
from tests.servers import ROOT, clean_environ, free_port, run_gateway

BOUND_S = 10.0


async def test_metrics_move_to_their_own_port(settings: Settings) -> None:
    port = free_port()
    async with run_gateway(settings.with_changes(metrics_port=port)) as gateway, \
            httpx.AsyncClient(timeout=BOUND_S) as http:
        public = await http.get(f"{gateway.url}/metrics")
        assert public.status_code == 404
        assert public.json() == {"code": 404, "msg": "not found", "data": None}
        own = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert own.status_code == 200
        assert "taskcast_open_connections" in own.text
        assert "taskcast_messages_delivered_total" in own.text
        assert (await http.get(f"{gateway.url}/healthz")).status_code == 200
    async with httpx.AsyncClient(timeout=BOUND_S) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/metrics")  # gone with the gateway


async def test_metrics_stay_on_the_main_port_by_default(settings: Settings) -> None:
    async with run_gateway(settings) as gateway, httpx.AsyncClient(timeout=BOUND_S) as http:
        response = await http.get(f"{gateway.url}/metrics")
        assert response.status_code == 200 and "taskcast_open_connections" in response.text


def test_a_metrics_port_with_several_workers_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskcast", "serve", "--workers", "2", "--metrics-port", "9999",
         "--redis-url", "redis://127.0.0.1:1/0"],
        cwd=ROOT, env=clean_environ(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "--metrics-port with --workers" in result.stderr
