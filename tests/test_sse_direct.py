"""Direct writes: a state that finds a single-task SSE stream idle and caught up is written to
the connection on the spot (OpenStream.push) instead of waking the stream's task.

What must hold: order (never ahead of a state the task still has to write), the terminal state
and everything for a busy or slow client on the ordinary path, the exact HTTP chunk on the wire,
and deliveries counted either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from taskcast.hub import TaskState, Watcher
from taskcast.metrics import Metrics
from taskcast.models import Task, TaskStatus
from taskcast.producer import Producer
from taskcast.streams import OpenStream
from tests.servers import Gateway, loopback_connections
from tests.sse_client import Follower, read_metric, stream_problems

BOUND_S = 20  # only against hangs


def state(version: int, status: TaskStatus = TaskStatus.PROCESSING, task_id: int = 7
          ) -> TaskState:
    return TaskState(Task(task_id=task_id, status=status, progress=min(version, 100),
                          type="", angle="", image_base64="", image_url="", error_message="",
                          version=version, updated_at=1_700_000_000_000))


class RecordingSink:
    """A hub.DirectSink that takes (or refuses) whatever it is offered."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.pushed: list[int] = []

    def push(self, state: TaskState) -> bool:
        if self.accept:
            self.pushed.append(state.version)
        return self.accept


async def waiting(watcher: Watcher) -> asyncio.Task[list[TaskState]]:
    """The watcher's consumer, suspended in next_batch()."""
    consumer = asyncio.create_task(watcher.next_batch())
    await asyncio.sleep(0)
    assert not consumer.done()
    return consumer


async def test_a_state_for_an_idle_caught_up_watcher_goes_to_its_sink() -> None:
    watcher = Watcher(Metrics())
    sink = watcher.sink = RecordingSink()
    consumer = await waiting(watcher)

    watcher.offer(state(2))
    watcher.offer(state(3))
    watcher.offer(state(3))  # not newer: nowhere
    await asyncio.sleep(0)

    assert sink.pushed == [2, 3]
    assert not consumer.done() and not watcher.pending  # the consumer slept through
    watcher.offer(state(4, TaskStatus.COMPLETED))  # the terminal state wakes the consumer
    assert [s.version for s in await consumer] == [4]
    assert sink.pushed == [2, 3]


async def test_nothing_overtakes_a_state_the_consumer_has_not_taken() -> None:
    watcher = Watcher(Metrics())
    sink = watcher.sink = RecordingSink()
    watcher.offer(state(1))  # nobody waits yet: pending
    watcher.offer(state(2))  # conflated into the pending slot, not pushed ahead of it
    assert sink.pushed == [] and [s.version for s in watcher.pending.values()] == [2]
    assert [s.version for s in await watcher.next_batch()] == [2]

    consumer = await waiting(watcher)
    watcher.offer(state(3, task_id=8))  # idle again: pushed...
    assert sink.pushed == [3]
    sink.accept = False
    watcher.offer(state(4, task_id=8))  # ...a refusal leaves it to the consumer
    watcher.offer(state(5, task_id=8))  # and, pending now, nothing may pass it
    sink.accept = True
    watcher.offer(state(6, task_id=7))
    assert sink.pushed == [3]
    assert [s.version for s in await consumer] == [5, 6]


# --- OpenStream.push on a real connection ----------------------------------------------------


@pytest.fixture
async def connection() -> AsyncIterator[tuple[asyncio.Transport, asyncio.StreamReader]]:
    """A server-side transport and the reader of its client, over loopback."""
    async with loopback_connections(1, BOUND_S) as pairs:
        yield pairs[0]


def direct_stream(transport: asyncio.Transport, include: bool = True) -> OpenStream:
    stream = OpenStream(Watcher(Metrics()), {}, None)
    stream.transport = transport
    stream.include = include
    stream.delivered = {"sse": 0}
    return stream


async def test_push_writes_the_frame_as_one_http_chunk(
    connection: tuple[asyncio.Transport, asyncio.StreamReader]
) -> None:
    transport, reader = connection
    stream = direct_stream(transport)
    pushed = state(3)

    assert stream.push(pushed)

    frame = pushed.sse_frame(True)
    assert frame.startswith(b"id: 3\ndata: {") and frame.endswith(b"}\n\n")
    async with asyncio.timeout(BOUND_S):
        wire = await reader.readexactly(len(b"%x\r\n" % len(frame)) + len(frame) + 2)
    assert wire == b"%x\r\n" % len(frame) + frame + b"\r\n"
    assert stream.delivered == {"sse": 1} and stream.active


async def test_push_declines_while_bytes_wait_in_the_buffer_or_the_connection_closes(
    connection: tuple[asyncio.Transport, asyncio.StreamReader]
) -> None:
    transport, _ = connection  # the client never reads
    stream = direct_stream(transport)
    filler = b"x" * 1_000_000
    async with asyncio.timeout(BOUND_S):
        while not transport.get_write_buffer_size():  # the kernel's buffers fill up
            transport.write(filler)
            await asyncio.sleep(0)

    assert not stream.push(state(2))
    transport.close()
    assert not stream.push(state(3))
    assert stream.delivered == {"sse": 0}


# --- end to end -----------------------------------------------------------------------------


async def test_live_single_task_stream_written_directly_keeps_order_and_counts(
    gateway: Gateway, producer: Producer
) -> None:
    task = await producer.create()
    other = await producer.create()
    await producer.complete(other.task_id, image_url="https://cdn.example/y.png")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        before = await read_metric(http, "taskcast_messages_delivered_total",
                                   transport="sse") or 0
        single = Follower(http, f"/tasks/{task.task_id}/events",
                          expect=[task.task_id]).start()
        multi = Follower(http, f"/events?task_id={task.task_id},{other.task_id}",
                         expect=[task.task_id, other.task_id]).start()
        async with asyncio.timeout(BOUND_S):
            await single.ready.wait()
            await multi.ready.wait()
        hub = gateway.app.state.hub
        watchers = hub._topics[task.task_id].watchers
        # The single-task stream writes directly; the multi-task one batches as before.
        assert sorted(w.sink is not None for w in watchers) == [False, True]

        for progress in range(1, 100):
            await producer.progress(task.task_id, progress)
        await producer.complete(task.task_id, image_url="https://cdn.example/x.png")

        transcripts = [await single.result(BOUND_S), await multi.result(BOUND_S)]
        assert stream_problems(transcripts[0], [task.task_id]) == []
        assert stream_problems(transcripts[1], [task.task_id, other.task_id], multi=True) == []
        states = [len([f for f in t.frames if f.is_task]) for t in transcripts]
        # Conflation may skip states on either stream; the single one ends after the 100th.
        assert states[0] >= 2 and transcripts[0].frames[-1].task()["status"] == "completed"
        after = await read_metric(http, "taskcast_messages_delivered_total", transport="sse")
        assert after == before + sum(states)
