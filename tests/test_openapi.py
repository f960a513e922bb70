"""The OpenAPI document the gateway serves: the seed's path untouched, every route listed, and the
checked-in file matching what `scripts/gen_openapi.py` renders."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from starlette.routing import Route, WebSocketRoute

from tests.servers import Gateway

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "tests" / "data" / "task-status.openapi.yaml"
CHECKED_IN = ROOT / "src" / "taskcast" / "openapi.json"
GENERATOR = ROOT / "scripts" / "gen_openapi.py"
SEED_PATH = "/tasks/{task_id}"
EMPTY_ID_ALIAS = "/tasks/"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_openapi", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openapi_path(starlette_path: str) -> str:
    """`/tasks/{task_id:int}` -> `/tasks/{task_id}`: drop Starlette's convertor suffixes."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", starlette_path)


@pytest.fixture
async def served(gateway: Gateway) -> AsyncIterator[tuple[httpx.Response, dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        response = await client.get("/openapi.json")
    yield response, response.json()


async def test_openapi_json_is_served_as_json(
    served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    response, document = served
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert document["openapi"] == "3.0.1"
    assert document["info"]["title"] == "taskcast"


async def test_served_document_is_the_checked_in_file(
    served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    response, _ = served
    assert response.content == CHECKED_IN.read_bytes()


async def test_seed_path_item_is_served_exactly_as_in_the_seed(
    served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    _, document = served
    seed = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    assert document["paths"][SEED_PATH] == seed["paths"][SEED_PATH]
    # Spelled out, so a diff in the most important parts is easy to read.
    operation = document["paths"][SEED_PATH]["get"]
    assert operation["parameters"] == seed["paths"][SEED_PATH]["get"]["parameters"]
    assert set(operation["responses"]) == {"200", "404", "422", "500"}
    assert operation["responses"] == seed["paths"][SEED_PATH]["get"]["responses"]


async def test_every_http_route_of_the_app_is_documented_with_its_methods(
    gateway: Gateway, served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    _, document = served
    checked = []
    for route in gateway.app.routes:
        if not isinstance(route, Route) or route.path == EMPTY_ID_ALIAS:
            continue
        path = openapi_path(route.path)
        assert path in document["paths"], f"{route.path} is served but not documented"
        for method in route.methods or ():
            if method == "HEAD":  # Starlette adds HEAD to every GET route
                continue
            assert method.lower() in document["paths"][path], f"{method} {path} not documented"
        checked.append(path)
    assert {SEED_PATH, "/healthz", "/readyz", "/openapi.json"} <= set(checked)


async def test_every_websocket_route_of_the_app_is_in_the_document_paths(
    gateway: Gateway, served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    """OpenAPI 3.0 has no WebSocket operation, but the path (e.g. as a GET answered with
    101 Switching Protocols) must still be listed so clients can find it."""
    _, document = served
    undocumented = [route.path for route in gateway.app.routes
                    if isinstance(route, WebSocketRoute)
                    and openapi_path(route.path) not in document["paths"]]
    assert undocumented == []


async def test_every_route_of_the_app_is_an_http_or_websocket_route(gateway: Gateway) -> None:
    """A Mount or other kind of route would slip past the two checks above."""
    for route in gateway.app.routes:
        assert isinstance(route, Route | WebSocketRoute), route


async def test_every_documented_path_is_served(
    gateway: Gateway, served: tuple[httpx.Response, dict[str, Any]],
) -> None:
    _, document = served
    served_paths = {openapi_path(route.path) for route in gateway.app.routes
                    if isinstance(route, Route | WebSocketRoute)}
    assert set(document["paths"]) <= served_paths


def test_checked_in_openapi_json_is_what_the_generator_renders() -> None:
    rendered = load_generator().render()
    assert CHECKED_IN.read_text(encoding="utf-8") == rendered, (
        "src/taskcast/openapi.json is stale: run .venv/bin/python scripts/gen_openapi.py"
    )


def test_generated_document_keeps_the_seed_apart_from_info_and_servers() -> None:
    seed = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    document = json.loads(load_generator().render())
    for key in seed:
        if key in ("info", "servers", "paths"):
            continue
        assert document[key] == seed[key], key
    for path, item in seed["paths"].items():
        assert document["paths"][path] == item
