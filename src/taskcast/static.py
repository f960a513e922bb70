"""Files shipped inside the package (the browser client, the demo page)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response


@cache
def _read(name: str) -> bytes:
    return files("taskcast").joinpath("static", name).read_bytes()


def static_file(name: str, media_type: str) -> Response:
    """A file from the package's static/ folder (read once), to be revalidated by caches."""
    return Response(_read(name), media_type=media_type, headers={"Cache-Control": "no-cache"})


async def browser_client(request: Request) -> Response:
    """`/taskcast.js`: the dependency-free ES module for browsers."""
    return static_file("taskcast.js", "text/javascript; charset=utf-8")
