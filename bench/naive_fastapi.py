"""The naive service of bench/rest_poll.py: what a user would write from the seed's API doc.

FastAPI and redis.asyncio (redis-py, which parses with hiredis when it is installed), one
HGETALL per request, the seed's `{"code": 200, "msg": "success", "data": {...}}` built from the
hash and returned as a dict (FastAPI's jsonable_encoder and JSONResponse). No ETag, no cache,
no `?image_base64=false`. The one thing it takes from the Redis contract beyond the doc: an
image the producer staged (`image_bytes` on the record, every image over 64 KiB of base64) is
read from `P:task:{ID}:image` and base64-encoded, as the contract tells readers to; otherwise
the ~100 KB column would answer an empty image.

    NAIVE_REDIS_URL=redis://127.0.0.1:6379/0 NAIVE_PREFIX=taskcast \\
        .venv/bin/uvicorn naive_fastapi:app --app-dir bench --loop uvloop --http httptools \\
        --log-level warning --no-access-log
"""

from __future__ import annotations

import base64
import os
from typing import Any, cast

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import JSONResponse

PREFIX = os.environ.get("NAIVE_PREFIX", "taskcast")
redis = aioredis.Redis.from_url(os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"))

app = FastAPI()


def _int(value: str | None) -> int:
    return int(value) if value else 0


# response_model=None: the dict goes through jsonable_encoder, as for an endpoint written
# without a return annotation (the annotation is here for mypy only).
@app.get("/tasks/{task_id}", response_model=None)
async def get_task(task_id: int) -> Any:
    raw = cast(dict[bytes, bytes], await redis.hgetall(f"{PREFIX}:task:{{{task_id}}}"))
    if not raw:
        return JSONResponse({"code": 404, "msg": "task not found", "data": None},
                            status_code=404)
    record = {key.decode(): value.decode() for key, value in raw.items()}
    image_base64 = record.get("image_base64", "")
    if record.get("image_bytes"):
        image = cast(bytes | None, await redis.get(f"{PREFIX}:task:{{{task_id}}}:image"))
        image_base64 = base64.b64encode(image).decode("ascii") if image else ""
    return {
        "code": 200,
        "msg": "success",
        "data": {
            "task_id": task_id,
            "status": record.get("status", ""),
            "progress": _int(record.get("progress")),
            "type": record.get("type", ""),
            "angle": record.get("angle", ""),
            "image": {"image_base64": image_base64, "image_url": record.get("image_url", "")},
            "error_message": record.get("error_message", ""),
            "version": _int(record.get("version")),
            "updated_at": _int(record.get("updated_at")),
        },
    }
