"""The ceiling row of bench/rest_poll.py: Starlette on uvicorn, no Redis, one route answering
a small JSON body, at the same path as the task polls (so wrk's URL and the routing match).

    .venv/bin/uvicorn hello_starlette:app --app-dir bench --loop uvloop --http httptools \\
        --log-level warning --no-access-log
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"code": 200, "msg": "success", "data": "hello"})


app = Starlette(routes=[Route("/tasks/{task_id}", hello)])
