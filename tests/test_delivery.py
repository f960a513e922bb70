"""The delivery layer's rules (delivery.py), on the in-memory broker and real TCP connections.

A `Loopback` session is a transport of its own for these tests: items become length-prefixed
records written to a real loopback connection, directly when the connection is idle and
through an awaited write (the pump) otherwise; the client side reads the records back. So
what is checked is the delivery layer itself: states go out directly from the hub's callback
while the connection is idle and through the pump when it is not, nothing overtakes what is
queued, the last states and the end go out in one write, multi-task sessions batch a loop
turn's states, a stalled client is dropped after the send timeout, and a released session
leaves nothing behind in the hub. The same rules under SSE and WebSocket end to end are in
test_sse*.py and test_ws*.py."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from taskcast.broker_memory import MemoryTasks
from taskcast.delivery import Connections, End, Item, Session
from taskcast.hub import Hub, TaskState
from taskcast.metrics import Metrics
from taskcast.models import Task, TaskStatus
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.servers import Gateway, loopback_connections
from tests.sse_client import Follower, read_metric, stream_problems

BOUND_S = 10  # only against hangs


def task(task_id: int, version: int, status: TaskStatus = TaskStatus.PROCESSING) -> Task:
    progress = 100 if status is TaskStatus.COMPLETED else min(version, 99)
    return Task(task_id=task_id, status=status, progress=progress, version=version)


def record(item: Item) -> bytes:
    payload = item if isinstance(item, bytes) else b"%d:%d" % (item.task_id, item.version)
    return struct.pack("!H", len(payload)) + payload


class Loopback(Session):
    """A test transport: length-prefixed records on a real TCP connection."""

    transport = "sse"  # counted like SSE in the metrics
    keepalive = b"keep-alive"

    def __init__(self, conns: Connections, connection: asyncio.Transport, *,
                 ends_when_done: bool = True) -> None:
        super().__init__(conns, ends_when_done=ends_when_done)
        self.connection = connection
        self.writes: list[tuple[str, list[bytes]]] = []  # ("direct"|"pumped"|"end", records)
        self.ended: End | None = None
        self.send_gate: asyncio.Event | None = None  # set: pumped writes wait for it

    def _writable(self) -> bool:
        return not self.connection.get_write_buffer_size() and not self.connection.is_closing()

    def _write_state(self, state: TaskState) -> bool:
        return self._write_now([state])

    def _write_now(self, items: list[Item]) -> bool:
        if not self._writable():
            return False
        self._emit("direct", items)
        return True

    async def _send(self, items: list[Item]) -> None:
        if self.send_gate is not None:
            await self.send_gate.wait()
        self._emit("pumped", items)

    async def _finish(self, items: list[Item]) -> None:
        if self.send_gate is not None:
            await self.send_gate.wait()
        self._emit("end", items)
        self.ended = self.end

    def _emit(self, how: str, items: list[Item]) -> None:
        records = [record(item) for item in items]
        self.writes.append((how, records))
        self.connection.write(b"".join(records))

    def _abort(self) -> bool:
        self.connection.abort()
        return True

    @property
    def states_written(self) -> list[tuple[str, list[bytes]]]:
        return [(how, [r[2:] for r in records]) for how, records in self.writes]


@pytest.fixture
def tasks() -> MemoryTasks:
    return MemoryTasks()


@pytest.fixture
async def conns(tasks: MemoryTasks) -> AsyncIterator[Connections]:
    metrics = Metrics()
    hub = Hub(tasks.broker, tasks.reader, metrics, resync_interval_s=60)
    connections = Connections(hub, metrics, Settings(send_timeout_s=0.4, sse_keepalive_s=0.2))
    hub.start()
    connections.start()
    yield connections
    await connections.close()
    await hub.close()


@asynccontextmanager
async def loopback() -> AsyncIterator[tuple[asyncio.Transport, asyncio.StreamReader]]:
    async with loopback_connections(1, BOUND_S) as pairs:
        yield pairs[0]


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND_S):
        while not check():
            await asyncio.sleep(0.005)


def sample(conns: Connections, name: str, **labels: str) -> float:
    return conns.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_states_for_an_idle_connection_are_written_from_the_hubs_callback(
    tasks: MemoryTasks, conns: Connections
) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1))])
        for version in (2, 3):
            conns.hub.accept(task(1, version))  # a state arrives, and nothing yields
            assert session.states_written[-1] == ("direct", [b"1:%d" % version])
        assert not pump.done() and session.sending_since == 0.0
        assert conns.metrics.delivered["sse"] == 3
        conns.hub.accept(task(1, 4, TaskStatus.COMPLETED))
        # The terminal state waits for the end: both go out in one write, by the pump.
        async with asyncio.timeout(BOUND_S):
            await pump
        assert session.states_written[-1] == ("end", [b"1:4"])
        assert session.ended is End.DONE
        session.release()


async def test_nothing_overtakes_what_waits_for_a_stalled_connection(
    tasks: MemoryTasks, conns: Connections
) -> None:
    tasks.write(task(1, 1))
    tasks.write(task(2, 1))
    async with loopback() as (connection, reader):
        session = Loopback(conns, connection, ends_when_done=False)
        session.send_gate = asyncio.Event()
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1)), (2, await conns.hub.lookup(2))])
        await turns()
        assert session.states_written == [("direct", [b"1:1", b"2:1"])]
        connection.pause_reading()
        filler = b"x" * 1_000_000
        async with asyncio.timeout(BOUND_S):  # the client stops reading: buffers fill up
            while not connection.get_write_buffer_size():
                connection.write(filler)
                await asyncio.sleep(0)
        for version in (2, 3, 4):
            conns.hub.accept(task(1, version))  # conflated in the mailbox
        session.send_control(b"control")
        conns.hub.accept(task(2, 2))
        await turns()
        assert session.states_written == [("direct", [b"1:1", b"2:1"])]  # nothing direct
        assert sample(conns, "taskcast_updates_conflated_total") == 2
        session.send_gate.set()
        await until(lambda: len(session.writes) == 2)
        # Control messages first, then the newest state per task, in the order the tasks
        # became pending.
        assert session.states_written[1] == ("pumped", [b"control", b"1:4", b"2:2"])
        session.release()
        async with asyncio.timeout(BOUND_S):
            await pump
        del reader


async def test_a_session_following_several_tasks_writes_one_loop_turns_states_at_once(
    tasks: MemoryTasks, conns: Connections
) -> None:
    for task_id in (1, 2, 3):
        tasks.write(task(task_id, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(task_id, await conns.hub.lookup(task_id)) for task_id in (1, 2, 3)])
        await turns()
        for task_id in (1, 2, 3):
            conns.hub.accept(task(task_id, 2))
        assert len(session.writes) == 1  # not yet: at the end of this turn of the loop
        await turns()
        assert session.states_written[1] == ("direct", [b"1:2", b"2:2", b"3:2"])
        session.release()
        async with asyncio.timeout(BOUND_S):
            await pump


async def test_a_multi_task_session_ends_once_every_task_is_finished(
    tasks: MemoryTasks, conns: Connections
) -> None:
    tasks.write(task(1, 2, TaskStatus.COMPLETED))
    tasks.write(task(2, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1)), (2, await conns.hub.lookup(2))])
        await turns()
        assert session.end is None  # task 1 is done, task 2 is not
        conns.hub.accept(task(2, 2, TaskStatus.FAILED))
        async with asyncio.timeout(BOUND_S):
            await pump
        assert session.ended is End.DONE
        assert [how for how, _ in session.states_written] == ["direct", "end"]
        session.release()


async def test_a_vanished_record_ends_the_session(tasks: MemoryTasks, conns: Connections
                                                  ) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1))])
        tasks.delete(1)
        tasks.broker.lose_connection()  # the re-read finds no record
        async with asyncio.timeout(BOUND_S):
            await pump
        assert session.ended is End.MISSING and session.end_detail == [1]
        session.release()


async def test_shutdown_ends_every_session(tasks: MemoryTasks, conns: Connections) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (first, _), loopback() as (second, _):
        sessions = [Loopback(conns, first), Loopback(conns, second)]
        pumps = [asyncio.create_task(session.pump()) for session in sessions]
        for session in sessions:
            session.watch([(1, await conns.hub.lookup(1))])
        conns.shutdown()
        async with asyncio.timeout(BOUND_S):
            await asyncio.gather(*pumps)
        assert [session.ended for session in sessions] == [End.SHUTDOWN, End.SHUTDOWN]
        for session in sessions:
            session.release()


async def test_a_quiet_session_gets_a_keepalive_and_a_busy_one_does_not(
    tasks: MemoryTasks, conns: Connections
) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1))])
        await until(lambda: any(b"keep-alive" in records for _, records in
                                session.states_written))
        session.release()
        async with asyncio.timeout(BOUND_S):
            await pump


async def test_a_write_that_does_not_return_in_time_drops_the_client(
    tasks: MemoryTasks, conns: Connections
) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (connection, reader):
        session = Loopback(conns, connection, ends_when_done=False)
        session.send_gate = asyncio.Event()  # never set: the client never takes a write
        connection.pause_reading()
        async with asyncio.timeout(BOUND_S):
            while not connection.get_write_buffer_size():
                connection.write(b"x" * 1_000_000)
                await asyncio.sleep(0)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1))])
        conns.hub.accept(task(1, 2))
        await until(lambda: session.end is End.TOO_SLOW)  # the sweeper, after 0.4 s
        assert sample(conns, "taskcast_slow_client_disconnects_total", transport="sse") == 1
        assert connection.is_closing()  # aborted, buffers freed
        session.send_gate.set()
        async with asyncio.timeout(BOUND_S):
            await pump
        session.release()
        del reader


async def test_a_released_session_leaves_nothing_in_the_hub(tasks: MemoryTasks,
                                                            conns: Connections) -> None:
    tasks.write(task(1, 1))
    async with loopback() as (connection, _):
        session = Loopback(conns, connection)
        pump = asyncio.create_task(session.pump())
        session.watch([(1, await conns.hub.lookup(1))])
        assert len(conns) == 1 and tasks.broker.subscribed == {1}
        session.release()
        async with asyncio.timeout(BOUND_S):
            await pump  # a waiting pump returns by itself
        assert len(conns) == 0 and tasks.broker.subscribed == set()
        conns.hub.accept(task(1, 2))  # no longer offered to it
        assert session.states_written == [("direct", [b"1:1"])]
        assert sample(conns, "taskcast_open_connections", transport="sse") == 0


# -- end to end ---------------------------------------------------------------------------------


async def test_live_single_and_multi_task_streams_keep_order_and_count_every_delivery(
    gateway: Gateway, producer: Producer
) -> None:
    live = await producer.create()
    other = await producer.create()
    await producer.complete(other.task_id, image_url="https://cdn.example/y.png")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as http:
        before = await read_metric(http, "taskcast_messages_delivered_total",
                                   transport="sse") or 0
        single = Follower(http, f"/tasks/{live.task_id}/events",
                          expect=[live.task_id]).start()
        multi = Follower(http, f"/events?task_id={live.task_id},{other.task_id}",
                         expect=[live.task_id, other.task_id]).start()
        async with asyncio.timeout(BOUND_S):
            await single.ready.wait()
            await multi.ready.wait()
        for progress in range(1, 100):
            await producer.progress(live.task_id, progress)
        await producer.complete(live.task_id, image_url="https://cdn.example/x.png")

        transcripts = [await single.result(BOUND_S), await multi.result(BOUND_S)]
        assert stream_problems(transcripts[0], [live.task_id]) == []
        assert stream_problems(transcripts[1], [live.task_id, other.task_id], multi=True) == []
        states = [len([f for f in t.frames if f.is_task]) for t in transcripts]
        # Conflation may skip states on either stream; the single one ends after the 100th.
        assert states[0] >= 2 and transcripts[0].frames[-1].task()["status"] == "completed"
        after = await read_metric(http, "taskcast_messages_delivered_total", transport="sse")
        assert after == before + sum(states)
