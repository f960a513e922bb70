"""`GET /tasks/{task_id}` over a real gateway and a real redis-server.

Every body is validated against the seed's own response schema for its status code
(tests/data/task-status.openapi.yaml), then compared exactly.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
import redis.asyncio as aioredis
import yaml

from taskcast.keys import TaskKeys
from taskcast.producer import Producer
from taskcast.settings import Settings
from taskcast.store import TaskStore
from tests.servers import Gateway, RedisServer, free_port, run_gateway, wait_ready

SEED = Path(__file__).parent / "data" / "task-status.openapi.yaml"
SEED_RESPONSES = yaml.safe_load(SEED.read_text(encoding="utf-8"))["paths"]["/tasks/{task_id}"][
    "get"
]["responses"]

INT64_MAX = 9223372036854775807
TASK_FIELDS = [
    "task_id", "status", "progress", "type", "angle", "image", "error_message", "version",
    "updated_at",
]
NOT_FOUND = {"code": 404, "msg": "task not found", "data": None}
INTERNAL_ERROR = {"code": 500, "msg": "internal server error", "data": None}
INT_PARSING_MSG = "Input should be a valid integer, unable to parse string as an integer"


def seed_schema(code: int) -> dict[str, Any]:
    schema: dict[str, Any] = SEED_RESPONSES[str(code)]["content"]["application/json"]["schema"]
    return schema


def seed_shape(response: httpx.Response, code: int) -> Any:
    """The decoded body, after checking status, content type and the seed's schema for `code`."""
    assert response.status_code == code, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    jsonschema.validate(body, seed_schema(code))
    return body


def envelope_shape(response: httpx.Response, code: int) -> Any:
    """Errors outside the seed's list (405, unknown routes) use the seed's 404/500 envelope."""
    assert response.status_code == code, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    jsonschema.validate(body, seed_schema(404))
    return body


def int_parsing(raw: str) -> dict[str, Any]:
    return {"detail": [{"type": "int_parsing", "loc": ["path", "task_id"],
                        "msg": INT_PARSING_MSG, "input": raw}]}


@pytest.fixture(scope="module")
def module_prefix(redis_server: RedisServer) -> str:
    prefix = f"rest-{uuid.uuid4().hex[:8]}"
    # Allocated ids start above 1000, clear of the fixed ids some tests create (7, int64 max).
    redis_server.cli("SET", TaskKeys(prefix).id_counter, "1000")
    return prefix


@pytest.fixture
def prefix(module_prefix: str) -> str:
    """Overrides conftest's: the `producer` and `redis` fixtures write under the shared
    gateway's prefix. Tasks get fresh ids from the producer, so tests do not collide."""
    return module_prefix


@pytest.fixture(scope="module")
async def shared_gateway(redis_server: RedisServer, module_prefix: str
                         ) -> AsyncIterator[Gateway]:
    """One real uvicorn for the module: starting and stopping one per test costs ~0.2 s each."""
    async with run_gateway(Settings(redis_url=redis_server.url, prefix=module_prefix)) as gw:
        yield gw


@pytest.fixture
async def client(shared_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shared_gateway.url, timeout=5) as http:
        yield http


# --- the schemas themselves -------------------------------------------------------------------


def test_seed_schemas_reject_bodies_of_the_wrong_shape() -> None:
    """Guards against validating with a vacuous schema: each one refuses a wrong body."""
    for code in (200, 404, 422, 500):
        jsonschema.Draft202012Validator.check_schema(seed_schema(code))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": 200, "msg": "success", "data": {"task_id": 1}},
                            seed_schema(200))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": 404, "msg": "task not found", "data": {}}, seed_schema(404))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"detail": "bad"}, seed_schema(422))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"code": 500, "msg": "x"}, seed_schema(500))


# --- 200 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["submitted", "processing", "completed", "failed"])
async def test_get_returns_the_seed_200_envelope_for_each_status(
    client: httpx.AsyncClient, producer: Producer, status: str
) -> None:
    task = await producer.create(type="txt2img", angle="front")
    if status == "processing":
        task = await producer.progress(task.task_id, 40)
    elif status == "completed":
        task = await producer.complete(task.task_id, image_url="https://cdn.example/x.png",
                                       image_base64=b"\x89PNG fake image")
    elif status == "failed":
        task = await producer.fail(task.task_id, "out of GPU memory")

    body = seed_shape(await client.get(f"/tasks/{task.task_id}"), 200)

    assert body["code"] == 200
    assert body["msg"] == "success"
    data = body["data"]
    assert list(data) == TASK_FIELDS
    assert list(data["image"]) == ["image_base64", "image_url"]
    assert data == task.to_dict()
    assert data["task_id"] == task.task_id
    assert data["status"] == status
    assert data["type"] == "txt2img"
    assert data["angle"] == "front"
    assert all(isinstance(data[name], int) for name in ("task_id", "progress", "version",
                                                        "updated_at"))
    assert data["updated_at"] > 1_600_000_000_000  # milliseconds since the epoch
    expected = {
        "submitted": (0, 1, "", "", ""),
        "processing": (40, 2, "", "", ""),
        "completed": (100, 2, base64.b64encode(b"\x89PNG fake image").decode(),
                      "https://cdn.example/x.png", ""),
        "failed": (0, 2, "", "", "out of GPU memory"),
    }[status]
    assert (data["progress"], data["version"], data["image"]["image_base64"],
            data["image"]["image_url"], data["error_message"]) == expected


async def test_get_of_a_successful_task_sends_json_etag_and_no_cache_headers(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    response = await client.get(f"/tasks/{task.task_id}")
    seed_shape(response, 200)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["etag"] == '"1"'
    assert response.headers["cache-control"] == "no-cache"
    assert int(response.headers["content-length"]) == len(response.content)


async def test_leading_zeros_address_the_same_task(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    await producer.create(task_id=7, type="t")
    padded = await client.get("/tasks/007")
    plain = await client.get("/tasks/7")
    assert seed_shape(padded, 200)["data"]["task_id"] == 7
    assert padded.json() == seed_shape(plain, 200)
    assert padded.headers["etag"] == plain.headers["etag"]


async def test_the_largest_int64_id_is_valid_and_404_when_absent(
    client: httpx.AsyncClient,
) -> None:
    body = seed_shape(await client.get(f"/tasks/{INT64_MAX}"), 404)
    assert body == NOT_FOUND


async def test_the_largest_int64_id_round_trips_exactly(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    await producer.create(task_id=INT64_MAX)
    response = await client.get(f"/tasks/{INT64_MAX}")
    assert seed_shape(response, 200)["data"]["task_id"] == INT64_MAX
    assert b'"task_id":9223372036854775807,' in response.content


# --- 404 --------------------------------------------------------------------------------------


async def test_unknown_task_id_gives_the_seed_404_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/tasks/123456789")
    assert seed_shape(response, 404) == NOT_FOUND
    assert response.content == b'{"code":404,"msg":"task not found","data":null}'


async def test_task_ids_are_isolated_by_key_prefix(
    client: httpx.AsyncClient, redis: aioredis.Redis, prefix: str
) -> None:
    other = Producer(redis, prefix=prefix + "-other")
    task = await other.create(task_id=880_001)
    assert seed_shape(await client.get(f"/tasks/{task.task_id}"), 404) == NOT_FOUND


# --- 422 --------------------------------------------------------------------------------------

BAD_IDS = [
    pytest.param("abc", "abc", int_parsing("abc"), id="letters"),
    pytest.param("-1", "-1", {"detail": [{
        "type": "greater_than_equal", "loc": ["path", "task_id"],
        "msg": "Input should be greater than or equal to 0", "input": "-1", "ctx": {"ge": 0},
    }]}, id="negative"),
    pytest.param("99999999999999999999", "99999999999999999999", {"detail": [{
        "type": "less_than_equal", "loc": ["path", "task_id"],
        "msg": f"Input should be less than or equal to {INT64_MAX}",
        "input": "99999999999999999999", "ctx": {"le": INT64_MAX},
    }]}, id="above-int64"),
    pytest.param("9223372036854775808", "9223372036854775808", {"detail": [{
        "type": "less_than_equal", "loc": ["path", "task_id"],
        "msg": f"Input should be less than or equal to {INT64_MAX}",
        "input": "9223372036854775808", "ctx": {"le": INT64_MAX},
    }]}, id="int64-max-plus-one"),
    # Python's int() refuses strings over 4300 digits: this was a 500 with a traceback.
    pytest.param("1" * 5000, "1" * 5000, {"detail": [{
        "type": "less_than_equal", "loc": ["path", "task_id"],
        "msg": f"Input should be less than or equal to {INT64_MAX}",
        "input": "1" * 5000, "ctx": {"le": INT64_MAX},
    }]}, id="5000-digits"),
    pytest.param("1.5", "1.5", int_parsing("1.5"), id="decimal-point"),
    pytest.param(quote(" 7"), " 7", int_parsing(" 7"), id="leading-space"),
    pytest.param("1_0", "1_0", int_parsing("1_0"), id="underscore-separator"),
    pytest.param(quote("٣"), "٣", int_parsing("٣"), id="arabic-indic-digit"),
    pytest.param(quote("任务"), "任务", int_parsing("任务"), id="chinese-text"),
    pytest.param("", "", int_parsing(""), id="empty-id"),
]


@pytest.mark.parametrize(("path_id", "raw", "expected"), BAD_IDS)
async def test_invalid_task_id_gives_a_pydantic_style_422(
    client: httpx.AsyncClient, path_id: str, raw: str, expected: dict[str, Any]
) -> None:
    response = await client.get(f"/tasks/{path_id}")
    body = seed_shape(response, 422)
    assert body == expected
    assert body["detail"][0]["input"] == raw


async def test_invalid_image_base64_flag_gives_a_bool_parsing_422(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    response = await client.get(f"/tasks/{task.task_id}", params={"image_base64": "maybe"})
    assert seed_shape(response, 422) == {"detail": [{
        "type": "bool_parsing", "loc": ["query", "image_base64"],
        "msg": "Input should be a valid boolean, unable to interpret input", "input": "maybe",
    }]}


# --- 500 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [pytest.param("status", "bogus", id="unknown-status"),
     pytest.param("progress", "abc", id="non-integer-progress"),
     pytest.param("progress", "--5", id="double-minus-progress"),
     pytest.param("version", "v2", id="non-integer-version")],
)
async def test_corrupt_record_gives_the_seed_500_envelope_without_details(
    client: httpx.AsyncClient, producer: Producer, redis: aioredis.Redis, prefix: str,
    field: str, value: str,
) -> None:
    task = await producer.create()
    await redis.hset(TaskKeys(prefix).record(task.task_id), field, value)
    for params in ({}, {"image_base64": "false"}):
        response = await client.get(f"/tasks/{task.task_id}", params=params)
        assert seed_shape(response, 500) == INTERNAL_ERROR
        assert value.encode() not in response.content
        assert b"Traceback" not in response.content


@pytest.mark.parametrize(
    ("field", "value"),
    [pytest.param("status", "bogus", id="unknown-status"),
     pytest.param("progress", "abc", id="non-integer-progress"),
     pytest.param("progress", "--5", id="double-minus-progress"),
     pytest.param("version", "v2", id="non-integer-version")],
)
@pytest.mark.parametrize("if_none_match", [pytest.param('"1"', id="current-etag"),
                                           pytest.param("*", id="star")])
async def test_conditional_get_of_a_corrupt_record_is_500_not_304(
    client: httpx.AsyncClient, producer: Producer, redis: aioredis.Redis, prefix: str,
    field: str, value: str, if_none_match: str,
) -> None:
    """A corrupt record has no valid representation: a matching If-None-Match must not tell
    the client its cached copy is current (the unconditional GET of the same URL is a 500)."""
    task = await producer.create()
    await redis.hset(TaskKeys(prefix).record(task.task_id), field, value)
    response = await client.get(f"/tasks/{task.task_id}",
                                headers={"If-None-Match": if_none_match})
    assert seed_shape(response, 500) == INTERNAL_ERROR


async def test_one_corrupt_record_does_not_hide_the_others_from_a_batch_read(
    producer: Producer, redis: aioredis.Redis, prefix: str
) -> None:
    good, bad = await producer.create(), await producer.create()
    await redis.hset(TaskKeys(prefix).record(bad.task_id), "progress", "--5")
    found = await TaskStore(redis, TaskKeys(prefix)).get_many([good.task_id, bad.task_id])
    assert found == {good.task_id: good}


async def test_corrupt_record_written_by_plain_hset_gives_500(
    client: httpx.AsyncClient, redis: aioredis.Redis, prefix: str
) -> None:
    await redis.hset(TaskKeys(prefix).record(424242), mapping={"status": "bogus"})
    assert seed_shape(await client.get("/tasks/424242"), 500) == INTERNAL_ERROR


async def test_unreachable_redis_gives_the_seed_500_envelope(prefix: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with run_gateway(Settings(redis_url=closed, prefix=prefix, redis_timeout_s=0.5)) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            response = await http.get("/tasks/1")
    assert seed_shape(response, 500) == INTERNAL_ERROR
    assert b"Traceback" not in response.content
    assert b"127.0.0.1" not in response.content


# --- ETag / If-None-Match ---------------------------------------------------------------------


async def _task_at_version_3(producer: Producer) -> int:
    task = await producer.create()
    await producer.progress(task.task_id, 20)
    task = await producer.progress(task.task_id, 60)
    assert task.version == 3
    return task.task_id


@pytest.mark.parametrize(
    "if_none_match",
    [
        pytest.param('"3"', id="strong"),
        pytest.param('W/"3"', id="weak"),
        pytest.param('"1", "2", "3"', id="list"),
        pytest.param('"9",W/"3"', id="list-with-weak-no-spaces"),
        pytest.param("*", id="star"),
    ],
)
async def test_matching_if_none_match_gives_304_without_body(
    client: httpx.AsyncClient, producer: Producer, if_none_match: str
) -> None:
    task_id = await _task_at_version_3(producer)
    response = await client.get(f"/tasks/{task_id}", headers={"If-None-Match": if_none_match})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == '"3"'
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "if_none_match",
    [
        pytest.param('"2"', id="older-version"),
        pytest.param('W/"2"', id="weak-older-version"),
        pytest.param('"30"', id="prefix-lookalike"),
        pytest.param("3", id="unquoted"),
        pytest.param('"3-no-image-base64"', id="trimmed-representation-tag"),
        pytest.param('"1", "2"', id="list-without-current"),
    ],
)
async def test_non_matching_if_none_match_gives_the_full_200(
    client: httpx.AsyncClient, producer: Producer, if_none_match: str
) -> None:
    task_id = await _task_at_version_3(producer)
    response = await client.get(f"/tasks/{task_id}", headers={"If-None-Match": if_none_match})
    body = seed_shape(response, 200)
    assert body["data"]["version"] == 3
    assert response.headers["etag"] == '"3"'


async def test_etag_changes_when_the_task_changes(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    first = await client.get(f"/tasks/{task.task_id}")
    etag = first.headers["etag"]
    assert (await client.get(f"/tasks/{task.task_id}",
                             headers={"If-None-Match": etag})).status_code == 304
    await producer.progress(task.task_id, 10)
    second = await client.get(f"/tasks/{task.task_id}", headers={"If-None-Match": etag})
    assert seed_shape(second, 200)["data"]["progress"] == 10
    assert second.headers["etag"] == '"2"' != etag


async def test_if_none_match_star_on_an_unknown_task_is_still_404(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/tasks/987654321", headers={"If-None-Match": "*"})
    assert seed_shape(response, 404) == NOT_FOUND


# --- ?image_base64 ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "FALSE", "False"])
async def test_image_base64_false_empties_the_field_and_tags_the_trimmed_body(
    client: httpx.AsyncClient, producer: Producer, value: str
) -> None:
    task = await producer.create()
    task = await producer.complete(task.task_id, image_url="https://cdn.example/a.png",
                                   image_base64="aGVsbG8=")
    response = await client.get(f"/tasks/{task.task_id}", params={"image_base64": value})
    data = seed_shape(response, 200)["data"]
    assert data["image"] == {"image_base64": "", "image_url": "https://cdn.example/a.png"}
    assert data == task.to_dict(include_image_base64=False)
    assert response.headers["etag"] == f'"{task.version}-no-image-base64"'
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("value", ["true", "1", "yes", "on", "TRUE"])
async def test_image_base64_true_keeps_the_field(
    client: httpx.AsyncClient, producer: Producer, value: str
) -> None:
    task = await producer.create()
    task = await producer.complete(task.task_id, image_base64="aGVsbG8=")
    response = await client.get(f"/tasks/{task.task_id}", params={"image_base64": value})
    assert seed_shape(response, 200)["data"]["image"]["image_base64"] == "aGVsbG8="
    assert response.headers["etag"] == f'"{task.version}"'


async def test_trimmed_and_full_representations_revalidate_separately(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    task = await producer.create()
    task = await producer.complete(task.task_id, image_base64="aGVsbG8=")
    path = f"/tasks/{task.task_id}"
    trimmed_tag = f'"{task.version}-no-image-base64"'
    full_tag = f'"{task.version}"'

    trimmed_304 = await client.get(path, params={"image_base64": "false"},
                                   headers={"If-None-Match": trimmed_tag})
    assert trimmed_304.status_code == 304
    assert trimmed_304.content == b""
    assert trimmed_304.headers["etag"] == trimmed_tag

    trimmed_200 = await client.get(path, params={"image_base64": "false"},
                                   headers={"If-None-Match": full_tag})
    assert seed_shape(trimmed_200, 200)["data"]["image"]["image_base64"] == ""
    assert trimmed_200.headers["etag"] == trimmed_tag

    full_200 = await client.get(path, headers={"If-None-Match": trimmed_tag})
    assert seed_shape(full_200, 200)["data"]["image"]["image_base64"] == "aGVsbG8="
    assert full_200.headers["etag"] == full_tag


async def test_a_two_megabyte_image_is_absent_from_the_trimmed_response(
    client: httpx.AsyncClient, producer: Producer
) -> None:
    raw = os.urandom(1_536_000)  # 2,048,000 base64 characters
    encoded = base64.b64encode(raw).decode("ascii")
    assert len(encoded) == 2_048_000
    task = await producer.create(type="txt2img")
    task = await producer.complete(task.task_id, image_url="https://cdn.example/big.png",
                                   image_base64=raw)

    full = await client.get(f"/tasks/{task.task_id}")
    assert seed_shape(full, 200)["data"]["image"]["image_base64"] == encoded
    assert len(full.content) > 2_048_000

    trimmed = await client.get(f"/tasks/{task.task_id}", params={"image_base64": "false"})
    data = seed_shape(trimmed, 200)["data"]
    assert data["image"] == {"image_base64": "", "image_url": "https://cdn.example/big.png"}
    assert len(trimmed.content) < 1_000
    assert encoded[:64].encode() not in trimmed.content
    assert trimmed.headers["etag"] == f'"{task.version}-no-image-base64"'


# --- routes outside the endpoint --------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [pytest.param("/nope", id="unknown-top-level"),
     pytest.param("/tasks/1/extra", id="below-a-task"),
     pytest.param("/task/1", id="singular")],
)
async def test_unknown_route_gives_the_not_found_envelope(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert envelope_shape(response, 404) == {"code": 404, "msg": "not found", "data": None}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_a_task_give_the_405_envelope(
    client: httpx.AsyncClient, producer: Producer, method: str
) -> None:
    task = await producer.create()
    response = await client.request(method, f"/tasks/{task.task_id}")
    assert envelope_shape(response, 405) == {"code": 405, "msg": "method not allowed",
                                             "data": None}
    assert "GET" in response.headers["allow"]


async def test_healthz_answers_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == 200


async def test_readyz_answers_200_when_redis_answers(client: httpx.AsyncClient) -> None:
    response = await wait_ready(client)
    assert response.json() == {"code": 200, "msg": "ready",
                               "data": {"redis": "ok", "pubsub": "ok"}}
