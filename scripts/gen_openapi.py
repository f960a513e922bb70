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

Access control (when the gateway has a key; see the README): every task read, this endpoint
included, needs a JWT whose `tasks` claim names the task (or is `"*"`), given as
`Authorization: Bearer <token>` or as the query parameter `token`. No token, or one that is
malformed, badly signed, expired or not yet valid: 401
`{"code":401,"msg":"unauthorized","data":null}` with `WWW-Authenticate: Bearer ...`. A valid
token that does not name every requested task: 403 `{"code":403,"msg":"forbidden","data":null}`,
decided before the store is read. `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and
`/taskcast.js` stay public.

Limits: a process at TASKCAST_MAX_CONNECTIONS answers task reads (this endpoint included) with
503 `{"code":503,"msg":"server busy","data":null}` and `Retry-After`.
"""

ENVELOPE = {
    "type": "object",
    "required": ["code", "msg", "data"],
    "properties": {"code": {"type": "integer"}, "msg": {"type": "string"}, "data": {}},
}


LOOKUP_FAILED = ("Redis failed while the tasks were looked up, or a record is malformed "
                 "(contract 8): never a wrong 404 or a stream")


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or ENVELOPE}}}


TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "schema": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807}}
IMAGE_FLAG = {"name": "image_base64", "in": "query", "required": False,
              "description": "false leaves image.image_base64 empty in every event",
              "schema": {"type": "boolean", "default": True}}
TOKEN = {"name": "token", "in": "query", "required": False,
         "description": "access token, for clients that cannot set the Authorization header "
                        "(EventSource, browser WebSockets); the header wins when both are given",
         "schema": {"type": "string", "maxLength": 8192}}
AUTH_RESPONSES = {
    "401": _json("access control: no valid token"),
    "403": _json("access control: the token does not name the task(s)"),
    "503": _json("server busy: the process is at TASKCAST_MAX_CONNECTIONS (Retry-After)"),
}
LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "sent by EventSource on reconnect: the last version it got",
                 "schema": {"type": "string"}}
SSE_BODY = {"text/event-stream": {"schema": {"type": "string", "description": (
    "One event per task state: `id: <version>` and `data: <task object JSON>` (no event "
    "name, so EventSource.onmessage gets it); the first event also carries `retry: <ms>`. "
    "`: keep-alive` comment lines while quiet, with no blank line after them (no block "
    "without data, which generic parsers would hand out as an empty event). The current "
    "state comes first, then only newer versions; the terminal state always comes last, "
    "then the stream ends. The response "
    "says `Connection: close`: the server closes the connection itself soon after the end "
    "(at most about 1 s), so a client must not send another request on it.")}}}

EXTRA_PATHS: dict[str, Any] = {
    "/tasks/{task_id}/events": {
        "get": {
            "summary": "Server-Sent Events of one task",
            "description": "With access control on, the stream ends with `event: token_expired` "
                           "(data `{}`) when the token expires; reconnect with a fresh one.",
            "parameters": [TASK_ID, IMAGE_FLAG, LAST_EVENT_ID, TOKEN],
            "responses": {
                "200": {"description": "event stream", "content": SSE_BODY},
                "204": {"description": "Last-Event-ID is the terminal version: nothing more "
                        "will come (EventSource stops reconnecting)"},
                **AUTH_RESPONSES,
                "404": _json("task not found"),
                "422": {"description": "malformed task id or flag"},
                "500": _json(LOOKUP_FAILED),
            },
        }
    },
    "/events": {
        "get": {
            "summary": "Server-Sent Events of many tasks on one connection",
            "description": "Ends with `event: end`, `id: done` once every task is finished; "
                           "a reconnect with `Last-Event-ID: done` gets 204. With access "
                           "control on, the token must name every task (else 403), and the "
                           "stream ends with `event: token_expired` when it expires.",
            "parameters": [
                {"name": "task_id", "in": "query", "required": True,
                 "description": "repeat it, or separate ids with commas",
                 "style": "form", "explode": True,
                 "schema": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
                IMAGE_FLAG, LAST_EVENT_ID, TOKEN,
            ],
            "responses": {
                "200": {"description": "event stream", "content": SSE_BODY},
                "204": {"description": "the stream already ended (Last-Event-ID: done)"},
                **AUTH_RESPONSES,
                "404": _json("one of the tasks does not exist"),
                "422": {"description": "missing, malformed or too many task ids"},
                "500": _json(LOOKUP_FAILED),
            },
        }
    },
    "/ws": {
        "get": {
            "summary": "WebSocket: many tasks on one socket (upgrade)",
            "description": (
                "Client frames (JSON text): `{\"op\":\"subscribe\",\"task_ids\":[1,2]}`, "
                "`{\"op\":\"unsubscribe\",\"task_ids\":[1]}`, `{\"op\":\"ping\"}`, "
                "`{\"op\":\"auth\",\"token\":\"...\"}` (access control: also a refresh). "
                "Server frames: `task` (with `data`), `subscribed`, `unsubscribed`, `pong`, "
                "`authenticated` (with `exp`), `error` (`code` 400 bad frame, 401 no valid "
                "token, 403 tasks the token does not name, listed in `task_ids`, 404 unknown "
                "tasks, 405 unknown op, 422 bad ids, 500 a Redis error or a malformed record "
                "while subscribing: none of the listed tasks is subscribed). Close codes: "
                "1008 Origin refused (HTTP 403 "
                "before the upgrade), 1009 frame too big, 1012 server restart or "
                "TASKCAST_MAX_STREAM_S reached, 1013 server busy (TASKCAST_MAX_CONNECTIONS), "
                "4401 invalid "
                "token at the upgrade, no valid token within TASKCAST_WS_AUTH_TIMEOUT_S, or the "
                "token expired, 4413 too many subscriptions, 4429 rate limited, 4422 bad "
                "image_base64 flag. A client that stops reading has its connection aborted "
                "after TASKCAST_SEND_TIMEOUT_S (an abnormal closure, 1006, no close frame)."),
            "parameters": [IMAGE_FLAG, TOKEN],
            "responses": {"101": {"description": "switching protocols"},
                          "403": {"description": "Origin not allowed"}},
        }
    },
    "/tasks/{task_id}/ws": {
        "get": {
            "summary": "WebSocket: one task's states (upgrade)",
            "description": ("Task frames only; close 1000 after the terminal state, 4404 for an "
                            "unknown task, 4422 for a malformed id, 1011 when Redis fails "
                            "while the task is looked up (contract 8), 1012 and 1013 as on /ws; "
                            "with access control on, "
                            "4401 for a missing, invalid or expired token and 4403 for a "
                            "token that does not name the task (after the upgrade: browsers "
                            "hide a refused upgrade's status)."),
            "parameters": [TASK_ID, IMAGE_FLAG, TOKEN],
            "responses": {"101": {"description": "switching protocols"},
                          "403": {"description": "Origin not allowed"}},
        }
    },
    "/taskcast.js": {
        "get": {
            "summary": "The browser client: a dependency-free ES module",
            "description": "`watch(taskIds, onUpdate, options)` over SSE, falling back to "
                           "WebSocket and to REST polling with ETag.",
            "responses": {"200": {"description": "JavaScript module",
                                  "content": {"text/javascript": {}}}},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "description": "Not on this port when TASKCAST_METRICS_PORT is set (404 here): "
                           "they are then served by a listener of their own.",
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {}}}},
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness: the process answers",
            "responses": {"200": _json("alive")},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis answers PING, the pub/sub connection is up, and on a "
                       "Redis Cluster `cluster_state` is ok",
            "responses": {
                "200": _json('ready: data {"redis":"ok","pubsub":"ok"} (and "cluster":"ok" '
                             "on a Redis Cluster)"),
                "503": _json('not ready; data names the failing part: "redis":"unavailable",'
                             ' "pubsub":"disconnected" or "cluster":"fail"'),
            },
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
