"""`taskcast demo`: the gateway plus a simulated image-generation worker in one process.

The worker drives tasks through the same producer library and Lua script as a real one, and
renders a real small PNG per task, delivered both as `image_base64` and as an `image_url` that
the gateway serves from the record. Only the demo mounts these routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import logging
import math
import random
import struct
import time
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from taskcast.access import http_forbidden, http_grant
from taskcast.caps import WEBHOOK_EVENTS
from taskcast.demo_webhooks import demo_webhook_url
from taskcast.errors import InvalidParameter, TaskcastError
from taskcast.ids import parse_task_id
from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.responses import JSONBody, envelope, not_found, validation_error
from taskcast.settings import Settings
from taskcast.static import static_file
from taskcast.store import STORE_ERRORS, TaskStore
from taskcast.tokens import issue

logger = logging.getLogger(__name__)

MAX_TASKS_PER_REQUEST = 20
MAX_TOKEN_TTL_S = 86_400
SIMULATED_FAILURE = "simulated failure: the GPU ran out of memory"


def render_png(seed: int, size: int = 96) -> bytes:
    """A small gradient PNG whose colours depend on `seed`, built with zlib alone."""
    rng = random.Random(seed)
    top = [rng.randrange(40, 256) for _ in range(3)]
    bottom = [rng.randrange(0, 200) for _ in range(3)]
    rows = bytearray()
    for y in range(size):
        t = y / (size - 1)
        colour = bytes(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows += b"\x00" + colour * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b""))


class SimulatedWorker:
    """Runs each task like a generation job: submitted, progress in steps, then an image."""

    def __init__(self, producer: Producer, keys: TaskKeys, step_s: float = 0.4,
                 max_tasks: int = 1000) -> None:
        self.producer = producer
        self.keys = keys
        self.step_s = step_s
        # The demo runs on the embedded store by default, which keeps everything in memory:
        # beyond `max_tasks` the oldest tasks are deleted, their running jobs stopped.
        self.max_tasks = max_tasks
        self._jobs: dict[int, asyncio.Task[None]] = {}
        # The tasks this demo made, oldest first: the only ones it signs tokens for.
        self.created: dict[int, None] = {}

    async def start_tasks(self, count: int, type: str, angle: str, fail: bool,
                          webhook_url: str | None = None) -> list[int]:
        """Create `count` tasks, one after another, and start a job for each; returns their
        ids. With `webhook_url`, each task sends all its events there.
        Raises what Producer.create raises (the jobs already started go on). A job that
        meets a TaskcastError (Redis gone, say) logs it and stops, its task unfinished."""
        ids = []
        for _ in range(count):
            task = await self.producer.create(
                type=type, angle=angle, webhook_url=webhook_url,
                webhook_events=WEBHOOK_EVENTS if webhook_url else None)
            ids.append(task.task_id)
            self.created[task.task_id] = None
            job = self._jobs[task.task_id] = asyncio.create_task(self._run(task.task_id, fail))
            job.add_done_callback(functools.partial(self._job_done, task.task_id))
        await self._forget_oldest()
        return ids

    def _job_done(self, task_id: int, job: asyncio.Task[None]) -> None:
        self._jobs.pop(task_id, None)

    async def _forget_oldest(self) -> None:
        """Delete the oldest tasks beyond `max_tasks`: their records go (REST says 404, streams
        end with not-found) and their jobs stop."""
        excess = list(itertools.islice(self.created, max(0, len(self.created) - self.max_tasks)))
        if not excess:
            return
        for task_id in excess:
            del self.created[task_id]
            job = self._jobs.pop(task_id, None)
            if job is not None:
                job.cancel()
        try:
            # One DEL per key: on a Redis Cluster the records live in different slots.
            async with self.producer.redis.pipeline(transaction=False) as pipe:
                for task_id in excess:
                    pipe.delete(self.keys.record(task_id))
                await pipe.execute()
        except STORE_ERRORS as exc:  # the store keeps them; the demo goes on
            logger.warning("demo: deleting %d old tasks failed: %s", len(excess), exc)

    async def _run(self, task_id: int, fail: bool) -> None:
        rng = random.Random(task_id)
        try:
            await asyncio.sleep(self.step_s)
            progress = 0
            while progress < 90:
                progress = min(90, progress + rng.randrange(8, 25))
                await self.producer.progress(task_id, progress)
                if fail and progress >= 50:
                    await self.producer.fail(task_id, SIMULATED_FAILURE)
                    return
                await asyncio.sleep(self.step_s * rng.uniform(0.5, 1.5))
            await self.producer.complete(
                task_id, image_base64=render_png(task_id), image_url=f"/demo/images/{task_id}.png"
            )
        except TaskcastError as exc:  # e.g. Redis went away mid-job: the demo worker gives up
            logger.warning("demo task %d stopped: %s", task_id, exc)

    async def close(self) -> None:
        """Cancel the running jobs and wait for them; their tasks stay as they are."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)


async def start_tasks(request: Request) -> Response:
    """`POST /demo/tasks` with `{"count", "type", "angle", "fail", "token_ttl_s"}` (all
    optional): 201 with the new ids and a token for them (`token`, `exp`; null with access
    control off), 400 for a body that is not a JSON object, 422 for a bad field."""
    worker: SimulatedWorker = request.app.state.demo_worker
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    count, fail = body.get("count", 1), body.get("fail", False)
    type_, angle = body.get("type", ""), body.get("angle", "")
    if (isinstance(count, bool) or not isinstance(count, int)
            or not 1 <= count <= MAX_TASKS_PER_REQUEST):
        return validation_error([{"type": "int_range", "loc": ["body", "count"],
                                  "msg": f"count must be 1..{MAX_TASKS_PER_REQUEST}",
                                  "input": count}])
    if not isinstance(type_, str) or not isinstance(angle, str) or not isinstance(fail, bool):
        return validation_error([{"type": "type_error", "loc": ["body"],
                                  "msg": "type and angle must be strings, fail a boolean",
                                  "input": body}])
    ttl = _ttl(body, "token_ttl_s", request)
    if isinstance(ttl, Response):
        return ttl
    ids = await worker.start_tasks(count, type_[:64], angle[:64], fail,
                                   demo_webhook_url(request))
    return JSONBody({"code": 201, "msg": "created",
                     "data": {"task_ids": ids, **_token_for(request, ids, ttl)}},
                    status_code=201)


async def issue_token(request: Request) -> Response:
    """`POST /demo/tokens` with `{"task_ids": [...], "ttl_s": N}`: a fresh token for tasks this
    demo created (the refresh a real generation service offers its users), 403 for others."""
    worker: SimulatedWorker = request.app.state.demo_worker
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    raw_ids = body.get("task_ids")
    if (not isinstance(raw_ids, list) or not raw_ids or len(raw_ids) > 1000
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw_ids)):
        return validation_error([{"type": "list_type", "loc": ["body", "task_ids"],
                                  "msg": "task_ids must be a list of 1..1000 task ids",
                                  "input": raw_ids}])
    ttl = _ttl(body, "ttl_s", request)
    if isinstance(ttl, Response):
        return ttl
    if not set(raw_ids) <= worker.created.keys():
        return envelope(403, "forbidden: the demo signs only for tasks it created")
    return JSONBody({"code": 200, "msg": "success", "data": _token_for(request, raw_ids, ttl)})


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object body (none: `{}`), or the 400 to answer."""
    try:
        body: Any = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        return envelope(400, "body must be JSON")
    if not isinstance(body, dict):
        return envelope(400, "body must be a JSON object")
    return body


def _ttl(body: dict[str, Any], name: str, request: Request) -> float | Response:
    """The token lifetime the body asks for in `name` (default: demo_token_ttl_s), or the
    422 to answer."""
    value = body.get(name)
    if value is None:
        return float(request.app.state.settings.demo_token_ttl_s)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 1 <= value <= MAX_TOKEN_TTL_S):
        return validation_error([{"type": "float_range", "loc": ["body", name],
                                  "msg": f"{name} must be 1..{MAX_TOKEN_TTL_S} seconds",
                                  "input": value}])
    return float(value)


def _token_for(request: Request, task_ids: list[int], ttl_s: float) -> dict[str, Any]:
    """`token` (null when access control is off) and its `exp`, for the demo page."""
    settings: Settings = request.app.state.settings
    if request.app.state.gate is None or not settings.jwt_secret:
        return {"token": None, "exp": None}
    now = time.time()
    token = issue(settings.jwt_secret, task_ids, ttl_s, audience=settings.jwt_audience or None,
                  issuer=settings.jwt_issuer or None, now=now)
    return {"token": token, "exp": math.ceil(now + ttl_s)}  # the token's exp claim


async def task_image(request: Request) -> Response:
    """The PNG of a completed task, decoded from its record's image_base64; it reads a task,
    so it needs a token for it like REST (`?token=` for an <img>)."""
    store: TaskStore = request.app.state.store
    gate = request.app.state.gate
    grant = http_grant(gate, request.scope, "rest")
    if isinstance(grant, Response):
        return grant
    try:
        task_id = parse_task_id(request.path_params["task_id"])
    except InvalidParameter as exc:
        return validation_error([exc.detail])
    refusal = http_forbidden(gate, grant, [task_id], "rest")
    if refusal is not None:
        return refusal
    task = await store.get(task_id)
    if task is None or not task.image_base64:
        return not_found("image not found")
    try:
        png = base64.b64decode(task.image_base64, validate=True)
    except (binascii.Error, ValueError):
        return not_found("image not found")
    return Response(png, media_type="image/png",
                    # private: the response needs a token (with access control on), and the URL
                    # that carries one must not fill a shared cache.
                    headers={"Cache-Control": "private, max-age=86400, immutable"})


async def demo_page(request: Request) -> Response:
    """`GET /`: the demo page."""
    return static_file("demo.html", "text/html; charset=utf-8")


def demo_routes() -> list[BaseRoute]:
    """The demo's routes; only `taskcast demo` mounts them."""
    return [
        Route("/", demo_page, methods=["GET"]),
        Route("/demo/tasks", start_tasks, methods=["POST"]),
        Route("/demo/tokens", issue_token, methods=["POST"]),
        Route("/demo/images/{task_id}.png", task_image, methods=["GET"]),
    ]
