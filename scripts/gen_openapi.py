"""Regenerate src/taskcast/openapi.json: the seed's document with its path left untouched,
plus the endpoints taskcast adds. Run after changing either; a test fails when it is stale.

    .venv/bin/python scripts/gen_openapi.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "tests" / "data" / "task-status.openapi.yaml"
OUTPUT = ROOT / "src" / "taskcast" / "openapi.json"

DESCRIPTION = """\
taskcast serves the seed's `GET /tasks/{task_id}` exactly as specified and pushes the same task
object over Server-Sent Events and WebSocket. Extensions of the seed's endpoint that do not change
its documented shapes:

* every task object also carries `version` (1 on creation, +1 per change) and `updated_at`
  (milliseconds since the Unix epoch);
* responses carry `ETag: "<version>"`; a request with a matching `If-None-Match` gets
  `304 Not Modified` without a body;
* `?image_base64=false` returns `image.image_base64` as `""` (and the ETag
  `"<version>-no-image-base64"`), so pollers need not download a multi-megabyte image
  until they want it; a value that is not a boolean is a 422.
"""

ENVELOPE = {
    "type": "object",
    "required": ["code", "msg", "data"],
    "properties": {"code": {"type": "integer"}, "msg": {"type": "string"}, "data": {}},
}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or ENVELOPE}}}


EXTRA_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "Liveness: the process answers",
            "responses": {"200": _json("alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis answers PING",
            "responses": {"200": _json("ready"), "503": _json("Redis unreachable")},
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.0 document",
                                  "content": {"application/json": {}}}},
        }
    },
}


def build() -> dict[str, Any]:
    seed = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    document = copy.deepcopy(seed)
    document["info"] = {"title": "taskcast", "version": "1.0.0", "description": DESCRIPTION}
    # The seed's servers are placeholder hosts; the gateway serves from wherever it runs.
    document.pop("servers", None)
    for path, item in EXTRA_PATHS.items():
        assert path not in document["paths"], path
        document["paths"][path] = item
    return document


def render() -> str:
    return json.dumps(build(), ensure_ascii=False, indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUTPUT.relative_to(ROOT)}\n")
