"""The token-minting examples (examples/mint_token.py, examples/mint_token.mjs) and the
`taskcast.tokens.issue` helper, checked against a real gateway with access control on.

Each example runs as its header says, with the secret in TASKCAST_JWT_SECRET and task ids as
arguments; what it prints must open exactly those tasks on a gateway that has the same secret
(200) and no other task (403). The Node example needs Node and the `jose` package: it is
installed with npm into a temporary folder this module owns (its own npm cache too; nothing
global, nothing in the repository). When npm cannot install it, the test fails with npm's
output: the Node example has then not been checked, which is not a pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import jwt
import pytest

from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.tokens import issue
from tests.servers import Gateway, run_gateway

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SECRET = "token-examples-secret-0123456789abcdefghijkl"  # >= 32 bytes: HS256
TTL_S = 600  # what both examples promise
RUN_BOUND_S = 30.0  # one example run
NPM_BOUND_S = 300.0  # npm install, registry included
BIG_ID = 2**53 + 1  # above JavaScript's exact integers: a string in the Node token


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/mint_token.mjs copied into a temporary folder with `jose@5` installed next to
    it (Node resolves packages from the script's folder), ready to run."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("the Node example needs node and npm on PATH (Node 20); they are missing, "
                    "so examples/mint_token.mjs cannot be checked", pytrace=False)
    folder = tmp_path_factory.mktemp("mint-token-node")
    shutil.copy(EXAMPLES / "mint_token.mjs", folder / "mint_token.mjs")
    env = {**os.environ, "npm_config_cache": str(folder / ".npm-cache"),
           "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    argv = [npm, "install", "--prefix", str(folder), "--no-package-lock", "jose@5"]
    try:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=NPM_BOUND_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`npm install jose@5` did not finish in {NPM_BOUND_S:g} s: is the npm "
                    f"registry reachable? examples/mint_token.mjs was not checked.\n"
                    f"{_text(exc.stdout)}\n{_text(exc.stderr)}", pytrace=False)
    if done.returncode != 0 or not (folder / "node_modules" / "jose").is_dir():
        pytest.fail(f"`npm install jose@5` failed (exit {done.returncode}): is the npm registry "
                    f"reachable? examples/mint_token.mjs was not checked.\n"
                    f"--- stdout:\n{done.stdout[-2000:]}\n--- stderr:\n{done.stderr[-2000:]}",
                    pytrace=False)
    return folder / "mint_token.mjs"


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")[-2000:]
    return (output or "")[-2000:]


async def mint(argv: Sequence[str], secret: str = SECRET) -> str:
    """Run one example with the secret in its environment; the token it printed."""
    env = {**os.environ, "TASKCAST_JWT_SECRET": secret}
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(RUN_BOUND_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{argv} did not finish in {RUN_BOUND_S:g} s") from None
    assert process.returncode == 0, f"{argv} exited {process.returncode}:\n{err.decode()}"
    lines = out.decode().split()
    assert len(lines) == 1, f"{argv} should print one token, printed:\n{out.decode()}"
    return lines[0]


def python_example(*task_ids: int) -> list[str]:
    return [sys.executable, str(EXAMPLES / "mint_token.py"), *map(str, task_ids)]


def node_example_argv(script: Path, *task_ids: int) -> list[str]:
    return [shutil.which("node") or "node", str(script), *map(str, task_ids)]


def check_claims(token: str, tasks: list[int | str]) -> None:
    """HS256, exactly these tasks, and an exp TTL_S from now (as the examples say)."""
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["tasks"] == tasks
    assert abs(claims["exp"] - (time.time() + TTL_S)) < 30


@pytest.fixture
async def secured(settings: Settings, producer: Producer) -> AsyncIterator[Gateway]:
    """A gateway that needs tokens signed with SECRET, and tasks 41, 42 and BIG_ID."""
    for task_id in (41, 42, BIG_ID):
        await producer.create(task_id=task_id, type="txt2img", angle="front")
    async with run_gateway(settings.with_changes(jwt_secret=SECRET)) as gateway:
        yield gateway


async def status(gateway: Gateway, task_id: int, token: str, *, query: bool = False) -> int:
    """GET /tasks/{id} with the token (header, or ?token=); the status, after checking that a
    200 is the task asked for."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        if query:
            response = await client.get(f"/tasks/{task_id}", params={"token": token})
        else:
            response = await client.get(f"/tasks/{task_id}",
                                        headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 200:
        assert response.json()["data"]["task_id"] == task_id
    return response.status_code


async def test_gateway_needs_a_token(secured: Gateway) -> None:
    async with httpx.AsyncClient(base_url=secured.url, timeout=10) as client:
        response = await client.get("/tasks/41")
    assert response.status_code == 401
    assert response.json() == {"code": 401, "msg": "unauthorized", "data": None}


async def test_python_example(secured: Gateway) -> None:
    token = await mint(python_example(41))
    check_claims(token, [41])
    assert await status(secured, 41, token) == 200
    assert await status(secured, 41, token, query=True) == 200
    assert await status(secured, 42, token) == 403


async def test_python_example_big_id_and_several_tasks(secured: Gateway) -> None:
    token = await mint(python_example(41, BIG_ID))
    check_claims(token, [41, BIG_ID])  # Python holds any int exactly: a JSON number
    assert await status(secured, BIG_ID, token) == 200
    assert await status(secured, 41, token) == 200
    assert await status(secured, 42, token) == 403


async def test_python_example_signs_with_the_secret_it_is_given(secured: Gateway) -> None:
    token = await mint(python_example(41), secret="another-secret-0123456789abcdefghijkl")
    assert await status(secured, 41, token) == 401


async def test_node_example(secured: Gateway, node_example: Path) -> None:
    token = await mint(node_example_argv(node_example, 41))
    check_claims(token, [41])
    assert await status(secured, 41, token) == 200
    assert await status(secured, 41, token, query=True) == 200
    assert await status(secured, 42, token) == 403


async def test_node_example_big_id_as_string(secured: Gateway, node_example: Path) -> None:
    token = await mint(node_example_argv(node_example, 41, BIG_ID))
    check_claims(token, [41, str(BIG_ID)])  # a decimal string: exact in JavaScript too
    assert await status(secured, BIG_ID, token) == 200
    assert await status(secured, 41, token) == 200
    assert await status(secured, 42, token) == 403


async def test_node_example_signs_with_the_secret_it_is_given(secured: Gateway,
                                                               node_example: Path) -> None:
    token = await mint(node_example_argv(node_example, 41),
                       secret="another-secret-0123456789abcdefghijkl")
    assert await status(secured, 41, token) == 401


async def test_taskcast_issue(secured: Gateway) -> None:
    token = issue(SECRET, [41], TTL_S)
    check_claims(token, [41])
    assert await status(secured, 41, token) == 200
    assert await status(secured, 42, token) == 403
    big = issue(SECRET, [BIG_ID], TTL_S)
    check_claims(big, [str(BIG_ID)])  # issue() writes ids above 2^53 as strings
    assert await status(secured, BIG_ID, big) == 200
    every = issue(SECRET, "*", TTL_S)
    assert await status(secured, 42, every) == 200
    assert jwt.decode(every, SECRET, algorithms=["HS256"])["tasks"] == "*"


def test_the_readme_quotes_both_examples_as_they_are() -> None:
    readme = (ROOT / "README.md").read_text()
    python = (ROOT / "examples" / "mint_token.py").read_text()
    node = (ROOT / "examples" / "mint_token.mjs").read_text()
    assert python[python.index("import os"):].rstrip() in readme
    assert node[node.index("import { SignJWT }"):].rstrip() in readme
