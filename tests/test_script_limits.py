"""Issue 12: the limits of the update script and of the producers that feed it.

Findings of issue 12 covered here (each test names its finding):
  caps       field caps of contract section 8 (type/angle, image_url, image_base64,
             error_message), enforced by the script, refusals writing and publishing nothing
  staged     staged images: raw bytes SET under an upload key, moved by the completion
  events     events leave out inline images over 64 KiB (`image_base64_omitted`)
  timeouts   timeout_s / deadline_ms / backstop TTL, and op "timeout"
  token      create idempotency by create_token
  producer   Producer / SyncProducer check the same caps before sending anything, stage big
             images and return (and read back) the full image
  adopt      Producer.create never returns a record it did not create

The script is driven on a real redis-server and on the embedded `memory://` store (with the
ScriptStore of tests/test_update_script.py) where practical; multi-MiB cases run on
redis-server only.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from taskcast.connection import connect, connect_sync
from taskcast.errors import TransitionRejected
from taskcast.models import Task
from taskcast.producer import Producer, SyncProducer
from tests.servers import RedisServer
from tests.test_update_script import ScriptStore, reason_of

TIMEOUT = 10.0
TASK = 12
MiB = 1024 * 1024
MAX_BASE64 = 16 * MiB
MAX_IMAGE_BYTES = 12_582_912
INLINE_EVENT_IMAGE = 65_536
BACKSTOP_S = 86_400
DEFAULT_TIMEOUT_S = 3_600
DEFAULT_RETENTION_S = 86_400


def create(**fields: Any) -> dict[str, Any]:
    return {"op": "create", **fields}


def update(**fields: Any) -> dict[str, Any]:
    return {"op": "update", **fields}


# --------------------------------------------------------------------------------------------
# Snapshots of every key under the prefix, whatever its type (records, uploads, images).


@dataclass(frozen=True)
class KeySnapshot:
    values: dict[Any, tuple[Any, Any]]
    pttl: dict[Any, int]


async def snapshot(client: aioredis.Redis, prefix: str) -> KeySnapshot:
    values: dict[Any, tuple[Any, Any]] = {}
    pttl: dict[Any, int] = {}
    async with asyncio.timeout(TIMEOUT):
        for key in sorted(await client.keys(f"{prefix}:*")):
            kind = await client.type(key)
            value: Any
            if kind == b"hash":
                value = await client.hgetall(key)
            elif kind == b"string":
                value = await client.get(key)
            elif kind == b"zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            else:
                value = None
            values[key] = (kind, value)
            pttl[key] = int(await client.pttl(key))
    return KeySnapshot(values, pttl)


def assert_unchanged(before: KeySnapshot, after: KeySnapshot) -> None:
    assert sorted(after.values) == sorted(before.values)
    for key, value in before.values.items():
        assert after.values[key] == value, key
        if before.pttl[key] < 0:
            assert after.pttl[key] == before.pttl[key], key
        else:  # counts down by itself; anything else means the TTL was set again
            assert before.pttl[key] - 5_000 <= after.pttl[key] <= before.pttl[key], key


async def run_raw(store: ScriptStore, keys: list[str], change: dict[str, Any]) -> bytes:
    return await store.run(keys, [orjson.dumps(change)])


async def assert_refused(
    store: ScriptStore, task_id: int, change: dict[str, Any], reason: str,
    keys: list[str] | None = None,
) -> str:
    """The change is refused with `reason`, writes nothing (every key under the prefix, its
    bytes and TTL) and publishes nothing. Returns the error text."""
    document = {"task_id": str(task_id), **change}
    before = await snapshot(store.client, store.prefix)
    async with store.events(task_id) as events:
        with pytest.raises(ResponseError) as info:
            await run_raw(store, keys or store.script_keys(task_id), document)
        published = await events.drain()
    after = await snapshot(store.client, store.prefix)
    assert reason_of(info.value) == reason, str(info.value)
    assert str(info.value).startswith(f"REJECTED {reason} ")
    assert_unchanged(before, after)
    assert published == []
    return str(info.value)


async def raw_record(store: ScriptStore, task_id: int) -> dict[bytes, bytes]:
    async with asyncio.timeout(TIMEOUT):
        record: Any = await store.client.hgetall(store.keys.record(task_id))
    return dict(record)


async def processing(store: ScriptStore, task_id: int = TASK, **create_fields: Any) -> None:
    await store.apply(task_id, create(**create_fields))
    await store.apply(task_id, update(status="processing", progress=40))


# --------------------------------------------------------------------------------------------
# caps: type and angle.

LABELS_ACCEPTED = [
    pytest.param("x" * 256, id="256-ascii"),
    pytest.param("é" * 128, id="256-bytes-of-2-byte-chars"),
    pytest.param("日" * 85 + "a", id="256-bytes-of-3-byte-chars"),
    pytest.param("", id="empty"),
]
LABELS_TOO_LARGE = [
    pytest.param("x" * 257, id="257-ascii"),
    pytest.param("é" * 128 + "a", id="257-bytes-129-chars"),
    pytest.param("日" * 86, id="258-bytes-86-chars"),
    pytest.param("😀" * 65, id="260-bytes-65-chars"),
]


@pytest.mark.parametrize("name", ["type", "angle"])
@pytest.mark.parametrize("value", LABELS_ACCEPTED)
async def test_caps_label_up_to_256_bytes_is_accepted_and_stored_exactly(
    store: ScriptStore, name: str, value: str
) -> None:
    """caps: type/angle of at most 256 bytes (counted in UTF-8 bytes) are accepted."""
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, create(**{name: value}))
        published = await events.drain()
    assert orjson.loads(reply)[name] == value
    assert published == [reply]
    assert (await raw_record(store, TASK))[name.encode()] == value.encode()


@pytest.mark.parametrize("name", ["type", "angle"])
@pytest.mark.parametrize("value", LABELS_TOO_LARGE)
async def test_caps_label_over_256_bytes_is_too_large_and_writes_nothing(
    store: ScriptStore, name: str, value: str
) -> None:
    """caps: type/angle over 256 bytes (also when under 256 characters) -> TOO_LARGE."""
    await assert_refused(store, TASK, create(**{name: value}), "TOO_LARGE")
    assert await raw_record(store, TASK) == {}


# --------------------------------------------------------------------------------------------
# caps: image_url.

URL_8192 = "https://cdn.example/" + "a" * (8192 - len("https://cdn.example/"))
URLS_ACCEPTED = [
    pytest.param("", id="empty"),
    pytest.param("https://cdn/x.png", id="https"),
    pytest.param("http://h/x", id="http"),
    pytest.param("/images/x.png", id="path"),
    pytest.param("HTTPS://CDN/X.PNG", id="scheme-any-case"),
    pytest.param("https://cdn/ïmage.png?a=1&b=2#f", id="non-ascii-query-fragment"),
    pytest.param(URL_8192, id="8192-bytes"),
]
URLS_REFUSED = [
    pytest.param(URL_8192 + "a", "TOO_LARGE", id="8193-bytes"),
    pytest.param("/" + "é" * 4096, "TOO_LARGE", id="8193-bytes-4097-chars"),
    pytest.param("javascript:alert(1)", "BAD_FIELD", id="javascript"),
    pytest.param("ftp://x", "BAD_FIELD", id="ftp"),
    pytest.param("data:image/png;base64,AAAA", "BAD_FIELD", id="data"),
    pytest.param("cdn/x.png", "BAD_FIELD", id="relative"),
    pytest.param("https://", "BAD_FIELD", id="no-host"),
    pytest.param("https:///x.png", "BAD_FIELD", id="empty-host"),
    pytest.param("https://cdn/x\n.png", "BAD_FIELD", id="newline"),
    pytest.param("/images/x.png\r\nSet-Cookie: a=b", "BAD_FIELD", id="crlf-in-path"),
    pytest.param("https://cdn/x\x00.png", "BAD_FIELD", id="nul"),
    pytest.param("https://cdn/x\x7f.png", "BAD_FIELD", id="del"),
]


@pytest.mark.parametrize("url", URLS_ACCEPTED)
async def test_caps_image_url_forms_that_are_accepted(store: ScriptStore, url: str) -> None:
    """caps: image_url "" / absolute http(s) URL / path starting with "/", <= 8192 bytes."""
    await processing(store)
    reply = await store.apply(TASK, update(status="completed", image_url=url))
    task = orjson.loads(reply)
    assert task["status"] == "completed"
    assert task["image"]["image_url"] == url
    assert (await raw_record(store, TASK))[b"image_url"] == url.encode()


@pytest.mark.parametrize(("url", "reason"), URLS_REFUSED)
async def test_caps_image_url_refused_writes_nothing(
    store: ScriptStore, url: str, reason: str
) -> None:
    """caps: image_url over 8192 bytes -> TOO_LARGE; other forms / control chars -> BAD_FIELD."""
    await processing(store)
    await assert_refused(store, TASK, update(status="completed", image_url=url), reason)


# --------------------------------------------------------------------------------------------
# caps: image_base64.


@pytest.mark.parametrize("image", [
    pytest.param("", id="empty"),
    pytest.param("aGVsbG8=", id="one-pad"),
    pytest.param("aGk=", id="hi"),
    pytest.param("aGVsbA==", id="two-pads"),
    pytest.param("AAEC/+8A", id="plus-slash"),
])
async def test_caps_small_valid_image_base64_is_accepted(store: ScriptStore, image: str) -> None:
    """caps: valid base64 is accepted (both backends; the 16 MiB case is redis-server only)."""
    await processing(store)
    task = orjson.loads(await store.apply(TASK, update(status="completed", image_base64=image)))
    assert task["image"]["image_base64"] == image
    assert "image_base64_omitted" not in task
    assert (await raw_record(store, TASK))[b"image_base64"] == image.encode()


@pytest.mark.parametrize("image", [
    pytest.param("abc", id="length-not-multiple-of-4"),
    pytest.param("ab=c", id="pad-in-the-middle"),
    pytest.param("####", id="not-the-alphabet"),
    pytest.param("a===", id="three-pads"),
    pytest.param("aGVs bG8=", id="space"),
    pytest.param("aGVsbG8=\n", id="newline"),
    pytest.param("aGVs-_8=", id="urlsafe-alphabet"),
])
async def test_caps_invalid_image_base64_is_bad_field(store: ScriptStore, image: str) -> None:
    """caps: image_base64 that is not valid base64 -> BAD_FIELD, nothing written."""
    await processing(store)
    await assert_refused(store, TASK, update(status="completed", image_base64=image),
                         "BAD_FIELD")


async def test_caps_image_base64_of_exactly_16_mib_is_accepted(real_store: ScriptStore) -> None:
    """caps: image_base64 of exactly 16 MiB (16,777,216 bytes) is accepted; its event leaves
    the bytes out (events finding) but the record keeps them."""
    store = real_store
    image = "QUJD" * (MAX_BASE64 // 4)
    assert len(image) == MAX_BASE64
    await processing(store)
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, update(status="completed", image_base64=image))
        published = await events.drain()
    task = orjson.loads(reply)
    assert task["status"] == "completed"
    assert task["image"]["image_base64"] == ""
    assert task["image_base64_omitted"] is True
    assert published == [reply]
    async with asyncio.timeout(TIMEOUT):
        stored = await store.client.hget(store.keys.record(TASK), "image_base64")
    assert stored == image.encode()


async def test_caps_image_base64_over_16_mib_is_too_large(real_store: ScriptStore) -> None:
    """caps: image_base64 of 16 MiB + 4 (valid base64 otherwise) -> TOO_LARGE."""
    await processing(real_store)
    await assert_refused(
        real_store, TASK, update(status="completed", image_base64="A" * (MAX_BASE64 + 4)),
        "TOO_LARGE")


# --------------------------------------------------------------------------------------------
# caps: error_message is cut, never refused.


def assert_cut(stored: bytes, original: str) -> None:
    """At most 4096 bytes, valid UTF-8, a prefix of the original, and as long as possible."""
    assert len(stored) <= 4096
    text = stored.decode("utf-8")  # raises for a character cut in half
    assert original.startswith(text)
    assert len(original[: len(text) + 1].encode()) > 4096  # one more character would not fit


@pytest.mark.parametrize(("message", "expected_bytes"), [
    pytest.param("x" * 5000, 4096, id="5000-ascii"),
    pytest.param("日" * 1700, 4095, id="3-byte-chars"),
    pytest.param("a" + "é" * 2100, 4095, id="2-byte-chars-odd-offset"),
    pytest.param("😀" * 1100, 4096, id="4-byte-chars-exact-boundary"),
    pytest.param("ab" + "😀" * 1100, 4094, id="4-byte-chars-offset-2"),
])
async def test_caps_long_error_message_is_cut_at_a_character_boundary(
    store: ScriptStore, message: str, expected_bytes: int
) -> None:
    """caps: error_message > 4096 bytes is stored and published cut to <= 4096 bytes, whole
    UTF-8 characters; the failure is never refused."""
    await processing(store)
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, update(status="failed", error_message=message))
        published = await events.drain()
    stored = (await raw_record(store, TASK))[b"error_message"]
    assert len(stored) == expected_bytes
    assert_cut(stored, message)
    task = orjson.loads(reply)
    assert task["status"] == "failed"
    assert task["error_message"].encode() == stored
    assert task["version"] == 3
    assert published == [reply]


async def test_caps_error_message_of_exactly_4096_bytes_is_kept_whole(store: ScriptStore) -> None:
    """caps: the cut only applies above 4096 bytes."""
    message = "é" * 2048
    await processing(store)
    await store.apply(TASK, update(status="failed", error_message=message))
    assert (await raw_record(store, TASK))[b"error_message"] == message.encode()


async def test_caps_repeating_a_failure_with_a_long_message_is_not_terminal(
    store: ScriptStore,
) -> None:
    """caps: a worker repeating its failure with the same over-long message gets the state
    (the cut message equals the stored one), nothing written, nothing published."""
    message = "日" * 2000
    await processing(store)
    first = orjson.loads(await store.apply(TASK, update(status="failed", error_message=message)))
    before = await snapshot(store.client, store.prefix)
    async with store.events(TASK) as events:
        again = orjson.loads(await store.apply(
            TASK, update(status="failed", error_message=message)))
        published = await events.drain()
    assert again == first
    assert published == []
    assert_unchanged(before, await snapshot(store.client, store.prefix))


# --------------------------------------------------------------------------------------------
# staged: completion with image_bytes and 4 keys.


def staged_keys(store: ScriptStore, task_id: int, token: str = "tok1",
                image_of: int | None = None, upload_of: int | None = None) -> list[str]:
    record, channel = store.script_keys(task_id)
    upload_id = task_id if upload_of is None else upload_of
    image_id = task_id if image_of is None else image_of
    return [record, channel, f"{store.prefix}:task:{{{upload_id}}}:upload:{token}",
            store.keys.image(image_id)]


async def put(store: ScriptStore, key: str, data: bytes) -> None:
    async with asyncio.timeout(TIMEOUT):
        await store.client.set(key, data, px=120_000)


IMAGE = bytes(range(256)) * 400 + b"\xff\xfe\x00end"  # not UTF-8, has NULs: raw bytes


async def complete_staged(store: ScriptStore, task_id: int = TASK, data: bytes = IMAGE,
                          retention_s: int = 3_600) -> bytes:
    keys = staged_keys(store, task_id)
    await put(store, keys[2], data)
    return await run_raw(store, keys, {
        "op": "update", "task_id": str(task_id), "status": "completed",
        "image_bytes": len(data), "retention_s": retention_s})


async def test_staged_completion_moves_the_upload_to_the_image_key(store: ScriptStore) -> None:
    """staged: the completion with image_bytes and 4 keys renames the upload to P:task:{ID}:image,
    the record has image_bytes and image_base64 "", the event says the image is omitted."""
    await processing(store)
    keys = staged_keys(store, TASK)
    await put(store, keys[2], IMAGE)
    async with store.events(TASK) as events:
        reply = await run_raw(store, keys, {
            "op": "update", "task_id": str(TASK), "status": "completed",
            "image_url": "https://cdn/x.png", "image_bytes": len(IMAGE), "retention_s": 3_600})
        published = await events.drain()

    task = orjson.loads(reply)
    assert task["status"] == "completed"
    assert task["progress"] == 100
    assert task["version"] == 3
    assert task["image"] == {"image_base64": "", "image_url": "https://cdn/x.png"}
    assert task["image_base64_omitted"] is True
    assert published == [reply]
    assert IMAGE not in published[0]
    assert base64.b64encode(IMAGE)[:64] not in published[0]

    record = await raw_record(store, TASK)
    assert record[b"image_bytes"] == str(len(IMAGE)).encode()
    assert record[b"image_base64"] == b""
    assert record[b"status"] == b"completed"
    async with asyncio.timeout(TIMEOUT):
        assert await store.client.get(keys[3]) == IMAGE
        assert await store.client.exists(keys[2]) == 0


@pytest.mark.parametrize("retention", [3_600, 0])
async def test_staged_image_key_gets_the_record_ttl_at_completion(
    store: ScriptStore, retention: int
) -> None:
    """staged: the image key expires with the record (retention_s), or neither does (0)."""
    await processing(store)
    await complete_staged(store, retention_s=retention)
    async with asyncio.timeout(TIMEOUT):
        record_pttl = int(await store.client.pttl(store.keys.record(TASK)))
        image_pttl = int(await store.client.pttl(store.keys.image(TASK)))
    if retention == 0:
        assert (record_pttl, image_pttl) == (-1, -1)
    else:
        assert (retention - 5) * 1000 <= record_pttl <= retention * 1000
        assert abs(record_pttl - image_pttl) < 1_000


@pytest.mark.parametrize(("uploaded", "declared"), [
    pytest.param(b"x" * 10, 11, id="upload-shorter"),
    pytest.param(b"x" * 12, 11, id="upload-longer"),
    pytest.param(None, 11, id="no-upload"),
])
async def test_staged_wrong_length_or_missing_upload_is_bad_field(
    store: ScriptStore, uploaded: bytes | None, declared: int
) -> None:
    """staged: the upload must exist and be exactly image_bytes long, else BAD_FIELD and
    nothing written (the upload is left alone, no image key appears)."""
    await processing(store)
    keys = staged_keys(store, TASK)
    if uploaded is not None:
        await put(store, keys[2], uploaded)
    await assert_refused(store, TASK, update(status="completed", image_bytes=declared),
                         "BAD_FIELD", keys=keys)
    async with asyncio.timeout(TIMEOUT):
        assert await store.client.exists(keys[3]) == 0


@pytest.mark.parametrize(("change", "reason"), [
    pytest.param(update(status="completed", image_bytes=MAX_IMAGE_BYTES + 1), "TOO_LARGE",
                 id="image-bytes-12582913"),
    pytest.param(update(status="completed", image_bytes=0), "BAD_FIELD", id="image-bytes-0"),
    pytest.param(update(status="completed", image_bytes=1.5), "BAD_FIELD",
                 id="image-bytes-fraction"),
    pytest.param(update(status="completed", image_bytes="11"), "BAD_FIELD",
                 id="image-bytes-string"),
    pytest.param(update(status="completed", image_bytes=11, image_base64="aGk="), "BAD_FIELD",
                 id="image-bytes-and-image-base64"),
    pytest.param(update(status="processing", image_bytes=11), "BAD_FIELD",
                 id="image-bytes-while-processing"),
])
async def test_staged_bad_image_bytes_is_refused(
    store: ScriptStore, change: dict[str, Any], reason: str
) -> None:
    """staged: image_bytes over 12582912 -> TOO_LARGE; other bad image_bytes -> BAD_FIELD."""
    await processing(store)
    keys = staged_keys(store, TASK)
    await put(store, keys[2], b"x" * 11)
    await assert_refused(store, TASK, change, reason, keys=keys)


async def test_staged_image_bytes_without_the_upload_keys_is_bad_request(
    store: ScriptStore,
) -> None:
    """staged: image_bytes needs KEYS[3] and KEYS[4]."""
    await processing(store)
    await assert_refused(store, TASK, update(status="completed", image_bytes=11), "BAD_REQUEST")


@pytest.mark.parametrize("which", ["upload-of-another-task", "image-of-another-task",
                                   "both-of-another-task", "bad-token", "five-keys",
                                   "keys-without-image-bytes"])
async def test_staged_keys_of_another_task_are_bad_request(
    store: ScriptStore, which: str
) -> None:
    """staged: keys 3/4 must be P:task:{ID}:upload:<token> and P:task:{ID}:image of this task."""
    await processing(store)
    await processing(store, TASK + 1)
    change = update(status="completed", image_bytes=11)
    if which == "upload-of-another-task":
        keys = staged_keys(store, TASK, upload_of=TASK + 1)
    elif which == "image-of-another-task":
        keys = staged_keys(store, TASK, image_of=TASK + 1)
    elif which == "both-of-another-task":
        keys = staged_keys(store, TASK, upload_of=TASK + 1, image_of=TASK + 1)
    elif which == "bad-token":
        keys = staged_keys(store, TASK, token="a b")
    elif which == "five-keys":
        keys = [*staged_keys(store, TASK), store.keys.image(TASK) + "x"]
    else:
        keys = staged_keys(store, TASK)
        change = update(status="completed", image_base64="aGk=")
    await put(store, keys[2], b"x" * 11)
    await assert_refused(store, TASK, change, "BAD_REQUEST", keys=keys)


async def test_staged_terminal_repeat_with_the_same_image_bytes_returns_the_state(
    store: ScriptStore,
) -> None:
    """staged: a worker repeating its staged completion gets the state, not TERMINAL;
    nothing is written or published, the image stays; another length is TERMINAL."""
    await processing(store)
    first = orjson.loads(await complete_staged(store))
    keys = staged_keys(store, TASK, token="tok2")
    await put(store, keys[2], IMAGE)
    before = await snapshot(store.client, store.prefix)
    async with store.events(TASK) as events:
        again = orjson.loads(await run_raw(store, keys, {
            "op": "update", "task_id": str(TASK), "status": "completed",
            "image_bytes": len(IMAGE), "retention_s": 3_600}))
        published = await events.drain()
    assert again == first
    assert published == []
    assert_unchanged(before, await snapshot(store.client, store.prefix))

    await assert_refused(store, TASK, update(status="completed", image_bytes=len(IMAGE) - 1),
                         "TERMINAL", keys=keys)


async def test_staged_image_of_the_maximum_size_is_accepted(real_store: ScriptStore) -> None:
    """staged: image_bytes 12582912 (what 16 MiB of base64 encodes) is accepted."""
    store = real_store
    await processing(store)
    data = os.urandom(MAX_IMAGE_BYTES)
    task = orjson.loads(await complete_staged(store, data=data))
    assert task["image_base64_omitted"] is True
    async with asyncio.timeout(TIMEOUT):
        assert await store.client.strlen(store.keys.image(TASK)) == MAX_IMAGE_BYTES


# --------------------------------------------------------------------------------------------
# events: inline images over 64 KiB are left out of the event.


@pytest.mark.parametrize(("size", "omitted"), [
    pytest.param(INLINE_EVENT_IMAGE, False, id="65536-carried"),
    pytest.param(INLINE_EVENT_IMAGE - 4, False, id="65532-carried"),
    pytest.param(INLINE_EVENT_IMAGE + 4, True, id="65540-omitted"),
])
async def test_events_inline_image_over_64_kib_is_left_out(
    store: ScriptStore, size: int, omitted: bool
) -> None:
    """events: an inline image_base64 over 65536 bytes is not in the event (nor the reply):
    "image_base64" "" and "image_base64_omitted": true; at most 65536 bytes it is carried.
    The record always keeps the whole image."""
    image = "QUJD" * (size // 4)
    await processing(store)
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, update(status="completed", image_base64=image))
        published = await events.drain()
    assert published == [reply]
    event = orjson.loads(published[0])
    if omitted:
        assert event["image"]["image_base64"] == ""
        assert event["image_base64_omitted"] is True
        assert len(published[0]) < 2_000
    else:
        assert event["image"]["image_base64"] == image
        assert "image_base64_omitted" not in event
    assert (await raw_record(store, TASK))[b"image_base64"] == image.encode()


# --------------------------------------------------------------------------------------------
# timeouts.


async def ttl_of(store: ScriptStore, task_id: int = TASK) -> int:
    return await store.ttl(task_id)


@pytest.mark.parametrize("timeout_s", [1, 120, 604_800, None])
async def test_timeouts_create_stores_timeout_deadline_and_backstop_ttl(
    store: ScriptStore, timeout_s: int | None
) -> None:
    """timeouts: create stores timeout_s (default 3600), deadline_ms = updated_at +
    timeout_s*1000, and the unfinished record expires timeout_s + 86400 s from now."""
    fields = {} if timeout_s is None else {"timeout_s": timeout_s}
    task = orjson.loads(await store.apply(TASK, create(**fields)))
    expected = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    record = await store.record(TASK)
    assert record["timeout_s"] == str(expected)
    assert int(record["deadline_ms"]) == task["updated_at"] + expected * 1000
    assert record["updated_at"] == str(task["updated_at"])
    assert expected + BACKSTOP_S - 5 <= await ttl_of(store) <= expected + BACKSTOP_S


async def test_timeouts_accepted_change_moves_the_deadline_and_finish_removes_it(
    store: ScriptStore,
) -> None:
    """timeouts: each accepted change sets deadline_ms = its updated_at + timeout_s*1000 and
    the backstop TTL; a change of timeout_s is kept; finishing removes deadline_ms and the
    record takes its retention TTL instead."""
    created = orjson.loads(await store.apply(TASK, create(timeout_s=120)))
    await asyncio.sleep(0.01)  # so that the next change has a later updated_at
    moved = orjson.loads(await store.apply(TASK, update(status="processing", progress=10)))
    record = await store.record(TASK)
    assert moved["updated_at"] > created["updated_at"]
    assert int(record["deadline_ms"]) == moved["updated_at"] + 120_000
    assert 120 + BACKSTOP_S - 5 <= await ttl_of(store) <= 120 + BACKSTOP_S

    longer = orjson.loads(await store.apply(TASK, update(progress=20, timeout_s=7_200)))
    record = await store.record(TASK)
    assert record["timeout_s"] == "7200"
    assert int(record["deadline_ms"]) == longer["updated_at"] + 7_200_000
    assert 7_200 + BACKSTOP_S - 5 <= await ttl_of(store) <= 7_200 + BACKSTOP_S

    only_timeout = orjson.loads(await store.apply(TASK, update(timeout_s=60)))
    assert only_timeout["version"] == longer["version"] + 1  # timeout_s alone is a change
    record = await store.record(TASK)
    assert int(record["deadline_ms"]) == only_timeout["updated_at"] + 60_000
    assert 60 + BACKSTOP_S - 5 <= await ttl_of(store) <= 60 + BACKSTOP_S

    await store.apply(TASK, update(status="completed", retention_s=600))
    record = await store.record(TASK)
    assert "deadline_ms" not in record
    assert 595 <= await ttl_of(store) <= 600


@pytest.mark.parametrize("timeout_s", [0, 604_801, 1.5, "10", -1, True, None])
@pytest.mark.parametrize("op", ["create", "update"])
async def test_timeouts_bad_timeout_s_is_bad_request(
    store: ScriptStore, timeout_s: Any, op: str
) -> None:
    """timeouts: timeout_s outside the integers 1..604800 -> BAD_REQUEST, nothing written."""
    if op == "update":
        await processing(store)
        change = update(progress=50, timeout_s=timeout_s)
    else:
        change = create(timeout_s=timeout_s)
    await assert_refused(store, TASK, change, "BAD_REQUEST")


async def test_timeouts_op_timeout_before_the_deadline_is_due_and_writes_nothing(
    store: ScriptStore,
) -> None:
    """timeouts: op "timeout" before deadline_ms answers "DUE <deadline_ms>", no write/event."""
    await store.apply(TASK, create(timeout_s=600))
    await store.apply(TASK, update(status="processing", progress=5))
    deadline = (await store.record(TASK))["deadline_ms"]
    before = await snapshot(store.client, store.prefix)
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, {"op": "timeout"})
        published = await events.drain()
    assert reply == f"DUE {deadline}".encode()
    assert published == []
    assert_unchanged(before, await snapshot(store.client, store.prefix))


async def test_timeouts_op_timeout_after_the_deadline_fails_the_task_once(
    store: ScriptStore,
) -> None:
    """timeouts: after the deadline op "timeout" fails the task (non-empty error_message
    saying it timed out, version+1, deadline removed, retention TTL), published once; a
    second op "timeout" answers "FINISHED" and changes nothing."""
    created = orjson.loads(await store.apply(TASK, create(timeout_s=1, retention_s=600)))
    await asyncio.sleep(1.2)
    async with store.events(TASK) as events:
        reply = await store.apply(TASK, {"op": "timeout"})
        published = await events.drain()
    task = orjson.loads(reply)
    assert task["status"] == "failed"
    assert "timed out" in task["error_message"]
    assert task["version"] == created["version"] + 1
    assert task["updated_at"] >= created["updated_at"] + 1_000
    assert published == [reply]
    record = await store.record(TASK)
    assert record["status"] == "failed"
    assert record["error_message"] == task["error_message"]
    assert record["version"] == "2"
    assert "deadline_ms" not in record
    assert 595 <= await ttl_of(store) <= 600

    before = await snapshot(store.client, store.prefix)
    async with store.events(TASK) as events:
        assert await store.apply(TASK, {"op": "timeout"}) == b"FINISHED"
        assert await events.drain() == []
    assert_unchanged(before, await snapshot(store.client, store.prefix))


async def test_timeouts_op_timeout_of_an_unknown_task_is_gone(store: ScriptStore) -> None:
    """timeouts: op "timeout" for an id without a record answers "GONE" and creates nothing."""
    async with store.events(TASK) as events:
        assert await store.apply(TASK, {"op": "timeout"}) == b"GONE"
        assert await events.drain() == []
    assert await snapshot(store.client, store.prefix) == KeySnapshot({}, {})


async def test_timeouts_op_timeout_fails_a_plain_record_without_deadline(
    store: ScriptStore,
) -> None:
    """timeouts: a record written by a plain HSET producer (no deadline_ms, no timeout_s) is
    judged by updated_at + the default 3600 s."""
    await store.hset(TASK, {"task_id": str(TASK), "status": "processing", "progress": "10",
                            "version": "3", "created_at": "1000", "updated_at": "1000"})
    task = orjson.loads(await store.apply(TASK, {"op": "timeout"}))
    assert task["status"] == "failed"
    assert task["version"] == 4
    assert "timed out" in task["error_message"]
    assert "3600" in task["error_message"]


async def test_timeouts_op_timeout_of_a_corrupt_record_is_refused(store: ScriptStore) -> None:
    """timeouts: op "timeout" never turns a malformed record into a failed one."""
    await store.hset(TASK, {"status": "processing", "progress": "lots"})
    await assert_refused(store, TASK, {"op": "timeout"}, "CORRUPT")


# --------------------------------------------------------------------------------------------
# token: create idempotency.


async def test_token_create_repeated_with_the_same_token_returns_the_same_record(
    store: ScriptStore,
) -> None:
    """token: a create sent again with its create_token returns that record (same version,
    nothing written, no second event); another token or none -> EXISTS."""
    async with store.events(TASK) as events:
        first = await store.apply(TASK, create(type="t2i", create_token="tok-A_1"))
        before = await snapshot(store.client, store.prefix)
        again = await store.apply(TASK, create(type="t2i", create_token="tok-A_1"))
        published = await events.drain()
    assert orjson.loads(again) == orjson.loads(first)
    assert orjson.loads(again)["version"] == 1
    assert published == [first]
    assert_unchanged(before, await snapshot(store.client, store.prefix))
    assert (await store.record(TASK))["create_token"] == "tok-A_1"

    await assert_refused(store, TASK, create(type="t2i", create_token="tok-B"), "EXISTS")
    await assert_refused(store, TASK, create(type="t2i"), "EXISTS")


@pytest.mark.parametrize(("change", "reason"), [
    pytest.param(create(create_token=""), "BAD_REQUEST", id="empty"),
    pytest.param(create(create_token="a" * 65), "BAD_REQUEST", id="65-chars"),
    pytest.param(create(create_token="a b"), "BAD_REQUEST", id="space"),
    pytest.param(create(create_token="a:b"), "BAD_REQUEST", id="colon"),
    pytest.param(create(create_token=5), "BAD_REQUEST", id="number"),
    pytest.param(update(progress=50, create_token="tok"), "BAD_REQUEST", id="on-update"),
])
async def test_token_bad_create_token_is_bad_request(
    store: ScriptStore, change: dict[str, Any], reason: str
) -> None:
    """token: create_token is 1..64 of [A-Za-z0-9_-], with op=create only."""
    if change["op"] == "update":
        await processing(store)
    await assert_refused(store, TASK, change, reason)


# --------------------------------------------------------------------------------------------
# producer: the same caps, checked before anything is sent.

WATCHED_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "script|load", "set", "incr",
                    "zadd", "zrem", "hset", "publish", "del", "rename")


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    async with asyncio.timeout(TIMEOUT):
        stats = await client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in WATCHED_COMMANDS}


class Flavour:
    """Producer or SyncProducer behind one awaitable interface."""

    def __init__(self, target: Producer | SyncProducer) -> None:
        self.target = target

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Task:
        result = getattr(self.target, method)(*args, **kwargs)
        if isinstance(self.target, Producer):
            result = await result
        assert isinstance(result, Task)
        return result


@dataclass(frozen=True)
class ProducerCase:
    id: str
    method: str
    kwargs: dict[str, Any]
    reason: str
    needs_task: bool = True


PRODUCER_REFUSALS = [
    ProducerCase("create-type-257", "create", {"type": "x" * 257}, "TOO_LARGE", False),
    ProducerCase("create-angle-257-bytes-129-chars", "create", {"angle": "é" * 128 + "a"},
                 "TOO_LARGE", False),
    ProducerCase("create-timeout-0", "create", {"timeout_s": 0}, "BAD_REQUEST", False),
    ProducerCase("create-timeout-604801", "create", {"timeout_s": 604_801}, "BAD_REQUEST",
                 False),
    ProducerCase("create-timeout-fraction", "create", {"timeout_s": 1.5}, "BAD_REQUEST", False),
    ProducerCase("create-explicit-id-timeout-0", "create", {"task_id": 999, "timeout_s": 0},
                 "BAD_REQUEST", False),
    ProducerCase("progress-timeout-0", "progress", {"progress": 50, "timeout_s": 0},
                 "BAD_REQUEST"),
    ProducerCase("complete-javascript-url", "complete", {"image_url": "javascript:alert(1)"},
                 "BAD_FIELD"),
    ProducerCase("complete-url-8193", "complete", {"image_url": URL_8192 + "a"}, "TOO_LARGE"),
    ProducerCase("complete-url-newline", "complete", {"image_url": "https://cdn/x\n.png"},
                 "BAD_FIELD"),
    ProducerCase("complete-invalid-base64", "complete", {"image_base64": "ab=c"}, "BAD_FIELD"),
    ProducerCase("complete-invalid-base64-####", "complete", {"image_base64": "####"},
                 "BAD_FIELD"),
    ProducerCase("complete-invalid-base64-large", "complete",
                 {"image_base64": "QUJD" * 20_000 + "#"}, "BAD_FIELD"),
    ProducerCase("complete-base64-text-16MiB+4", "complete",
                 {"image_base64": "QUJD" * (MAX_BASE64 // 4 + 1)}, "TOO_LARGE"),
    ProducerCase("complete-raw-bytes-12582913", "complete",
                 {"image_base64": b"\x00" * (MAX_IMAGE_BYTES + 1)}, "TOO_LARGE"),
    ProducerCase("complete-url-ok-but-image-too-large", "complete",
                 {"image_url": "https://cdn/x.png",
                  "image_base64": b"\x01" * (MAX_IMAGE_BYTES + 1)}, "TOO_LARGE"),
]


@pytest.mark.parametrize("case", PRODUCER_REFUSALS, ids=[case.id for case in PRODUCER_REFUSALS])
async def test_producer_checks_caps_before_sending_anything(
    flavour: Flavour, redis: aioredis.Redis, prefix: str, case: ProducerCase
) -> None:
    """producer: Producer and SyncProducer refuse what the script would refuse, with the same
    reason, before sending anything: the script is never called (INFO commandstats), no key
    under the prefix changes (record, id counter, timeout index, uploads)."""
    args: tuple[Any, ...] = ()
    if case.needs_task:
        task = await flavour.call("create", type="t")
        await flavour.call("progress", task.task_id, 40)
        args = (task.task_id,)
    before = await snapshot(redis, prefix)
    calls = await command_calls(redis)
    with pytest.raises(TransitionRejected) as info:
        await flavour.call(case.method, *args, **case.kwargs)
    assert await command_calls(redis) == calls
    assert_unchanged(before, await snapshot(redis, prefix))
    assert info.value.reason == case.reason


async def test_producer_command_calls_do_see_a_script_call(
    flavour: Flavour, redis: aioredis.Redis
) -> None:
    """producer: control for the test above: commandstats does count an accepted change."""
    task = await flavour.call("create", type="t")
    calls = await command_calls(redis)
    await flavour.call("progress", task.task_id, 10)
    assert await command_calls(redis) != calls


async def read_both(redis_server: RedisServer, redis: aioredis.Redis, prefix: str,
                    task_id: int) -> tuple[Task, Task]:
    client = connect_sync(redis_server.url)
    try:
        sync_read = SyncProducer(client, prefix=prefix).get(task_id)
    finally:
        client.close()
    return await Producer(redis, prefix=prefix).get(task_id), sync_read


@pytest.mark.parametrize("form", ["raw-bytes", "base64-text"])
async def test_producer_complete_with_1_mib_image_stages_it_and_returns_it_whole(
    flavour: Flavour, redis: aioredis.Redis, redis_server: RedisServer, prefix: str, form: str
) -> None:
    """producer/staged: complete() with a 1 MiB image returns a Task whose image_base64 is the
    whole image; the record holds it staged (image_bytes, image key, no upload left, event
    without bytes); Producer.get and SyncProducer.get return the whole image."""
    data = os.urandom(MiB)
    encoded = base64.b64encode(data).decode("ascii")
    task = await flavour.call("create", type="t")
    store = ScriptStore(redis, prefix)
    async with store.events(task.task_id) as events:
        done = await flavour.call(
            "complete", task.task_id, image_base64=data if form == "raw-bytes" else encoded)
        published = await events.drain()
    assert done.status == "completed"
    assert done.image_base64 == encoded
    assert not done.image_omitted
    assert done.version == 2

    record = await raw_record(store, task.task_id)
    assert record[b"image_bytes"] == str(MiB).encode()
    assert record[b"image_base64"] == b""
    async with asyncio.timeout(TIMEOUT):
        assert await redis.get(store.keys.image(task.task_id)) == data
        assert await redis.keys(f"{prefix}:task:{{{task.task_id}}}:upload:*") == []
    assert len(published) == 1
    event = orjson.loads(published[0])
    assert event["image_base64_omitted"] is True
    assert event["image"]["image_base64"] == ""

    for read in await read_both(redis_server, redis, prefix, task.task_id):
        assert read.image_base64 == encoded
        assert read.version == 2
        assert not read.image_omitted


async def test_producer_complete_with_a_small_image_sends_it_inline(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """producer/events: an image whose base64 fits in 64 KiB is sent inline and carried by
    the event (no staging, no image key)."""
    data = os.urandom(49_152)  # exactly 65536 bytes of base64
    encoded = base64.b64encode(data).decode("ascii")
    assert len(encoded) == INLINE_EVENT_IMAGE
    task = await flavour.call("create")
    store = ScriptStore(redis, prefix)
    async with store.events(task.task_id) as events:
        done = await flavour.call("complete", task.task_id, image_base64=data)
        published = await events.drain()
    assert done.image_base64 == encoded
    assert orjson.loads(published[0])["image"]["image_base64"] == encoded
    record = await raw_record(store, task.task_id)
    assert record[b"image_base64"] == encoded.encode()
    assert b"image_bytes" not in record
    async with asyncio.timeout(TIMEOUT):
        assert await redis.exists(store.keys.image(task.task_id)) == 0


async def test_producer_repeated_staged_completion_returns_the_state(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """producer/staged: a worker repeating complete() with the same big image gets the
    state back (not TERMINAL) with the whole image, and no upload key is left behind."""
    data = os.urandom(100_000)
    task = await flavour.call("create")
    first = await flavour.call("complete", task.task_id, image_base64=data)
    again = await flavour.call("complete", task.task_id, image_base64=data)
    assert again == first
    assert again.image_base64 == base64.b64encode(data).decode("ascii")
    async with asyncio.timeout(TIMEOUT):
        assert await redis.keys(f"{prefix}:task:{{{task.task_id}}}:upload:*") == []


# --------------------------------------------------------------------------------------------
# adopt: Producer.create never returns a record it did not create.


@pytest.mark.parametrize("foreign_by", ["other-producer", "script-without-token"])
async def test_adopt_create_skips_an_allocated_id_that_is_taken(
    flavour: Flavour, redis: aioredis.Redis, redis_server: RedisServer, prefix: str,
    foreign_by: str,
) -> None:
    """adopt: the id the counter hands out next is already taken by someone else's task;
    create() returns a new, different id with a record it created (version 1, its type),
    and the foreign record is untouched."""
    first = await flavour.call("create", type="mine")
    taken = first.task_id + 1
    store = ScriptStore(redis, prefix)
    if foreign_by == "other-producer":
        other = Producer(connect(redis_server.url), prefix=prefix)
        try:
            await other.create(task_id=taken, type="foreign", angle="theirs")
        finally:
            await other.close()
    else:
        await store.apply(taken, create(type="foreign", angle="theirs"))
    foreign_before = await raw_record(store, taken)

    mine = await flavour.call("create", type="mine", angle="a")
    assert mine.task_id != taken
    assert mine.task_id > taken
    assert (mine.version, mine.type, mine.angle, mine.status) == (1, "mine", "a", "submitted")
    record = await raw_record(store, mine.task_id)
    assert record[b"type"] == b"mine"
    assert record[b"version"] == b"1"
    assert record.get(b"create_token") != foreign_before.get(b"create_token")
    assert await raw_record(store, taken) == foreign_before


async def test_adopt_create_gives_up_after_five_taken_ids(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """adopt: five taken ids in a row -> EXISTS; none of the foreign records changes."""
    first = await flavour.call("create")
    store = ScriptStore(redis, prefix)
    taken = range(first.task_id + 1, first.task_id + 6)
    for task_id in taken:
        await store.apply(task_id, create(type="foreign"))
    before = {task_id: await raw_record(store, task_id) for task_id in taken}
    with pytest.raises(TransitionRejected) as info:
        await flavour.call("create", type="mine")
    assert info.value.reason == "EXISTS"
    assert {task_id: await raw_record(store, task_id) for task_id in taken} == before


async def test_adopt_create_with_a_taken_explicit_id_is_exists(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """adopt: an explicit task_id that is taken -> TransitionRejected("EXISTS"), record kept."""
    store = ScriptStore(redis, prefix)
    await store.apply(500, create(type="foreign"))
    before = await raw_record(store, 500)
    with pytest.raises(TransitionRejected) as info:
        await flavour.call("create", task_id=500, type="mine")
    assert info.value.reason == "EXISTS"
    assert await raw_record(store, 500) == before



async def test_producer_refused_staged_completion_leaves_no_upload_behind(
    flavour: Flavour, redis: aioredis.Redis, prefix: str
) -> None:
    """producer/staged: a staged completion the script refuses (TERMINAL: another image after
    the first) deletes its upload; the first image and the record stay as they were."""
    first_image, other_image = os.urandom(100_000), os.urandom(100_001)
    task = await flavour.call("create")
    await flavour.call("complete", task.task_id, image_base64=first_image)
    store = ScriptStore(redis, prefix)
    record = await raw_record(store, task.task_id)
    with pytest.raises(TransitionRejected) as info:
        await flavour.call("complete", task.task_id, image_base64=other_image)
    assert info.value.reason == "TERMINAL"
    assert await raw_record(store, task.task_id) == record
    async with asyncio.timeout(TIMEOUT):
        assert await redis.get(store.keys.image(task.task_id)) == first_image
        assert await redis.keys(f"{prefix}:task:{{{task.task_id}}}:upload:*") == []
