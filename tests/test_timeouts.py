"""Task timeouts (contract section 8; issue 12, finding "Dead workers"): a task with no accepted
change for its `timeout_s` becomes failed with an error_message saying it timed out, published
like any change, within `timeout_s + 10` s while at least one gateway runs; once with many
gateways; on a single Redis and on a Redis Cluster; and an unfinished record has a backstop
expiry.

Everything runs against real redis-server processes and real gateways (uvicorn) with a fast
sweep (`timeout_sweep_s`); waits are bounded, never timed assertions.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from taskcast.connection import connect
from taskcast.errors import TransitionRejected
from taskcast.keys import TaskKeys
from taskcast.models import Task, TaskStatus
from taskcast.producer import Producer
from taskcast.settings import Settings
from tests.channels import subscribed
from tests.servers import Gateway, RedisClusterNodes, RedisServer, run_gateway
from tests.sse_client import Follower, Transcript, read_metric, stream_problems
from tests.test_cluster import Layout, spread_task_ids

SWEEP_S = 0.3
GRACE_S = 10  # contract 8: failed within timeout_s + 10 s
BOUND_S = 20.0  # one step against hangs: a connection, a stream becoming ready
BACKSTOP_S = 86_400
TIMED_OUT = "taskcast_tasks_timed_out_total"
CHECKS = "taskcast_timeout_checks_total"
OVERDUE_MARGIN_MS = 1500  # "past its deadline": several sweep intervals after it
STOP_BOUND_S = 5.0  # an idle gateway stops in milliseconds


# -- helpers -----------------------------------------------------------------------------------


def sweeping(url: str, prefix: str, sweep_s: float = SWEEP_S) -> Settings:
    return Settings(redis_url=url, prefix=prefix, timeout_sweep_s=sweep_s)


def sweeper_tasks(gateway: Gateway) -> list[asyncio.Task[Any]]:
    """The gateway's TimeoutSweeper task (named taskcast-timeouts, on the gateway's client)."""
    found = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if task.get_name() == "taskcast-timeouts" and \
                getattr(owner, "redis", None) is gateway.app.state.store.redis:
            found.append(task)
    return found


@asynccontextmanager
async def gateway_on(settings: Settings, stuck: list[str] | None = None
                     ) -> AsyncIterator[Gateway]:
    """run_gateway(), whose stop is bounded by STOP_BOUND_S.

    A stop that takes longer is counted in `stuck` and then helped along by cancelling the
    gateway's timeout sweeper again: its close() cancels it once, and a cancellation that
    Python 3.11 swallows leaves the shutdown waiting forever (the bug that
    test_a_gateway_stops_while_its_timeout_sweep_is_busy shows). Other tests here then still
    test what they are about."""
    running = run_gateway(settings)
    gateway = await running.__aenter__()
    sweepers = sweeper_tasks(gateway)
    try:
        yield gateway
    finally:
        exiting = asyncio.create_task(running.__aexit__(None, None, None))
        done, _ = await asyncio.wait([exiting], timeout=STOP_BOUND_S)
        if not done:
            if stuck is not None:
                stuck.append(f"the gateway on port {gateway.port} took over {STOP_BOUND_S} s "
                             "to stop")
            async with asyncio.timeout(BOUND_S):
                while not exiting.done():
                    for task in sweepers:
                        task.cancel()
                    await asyncio.wait([exiting], timeout=0.05)
        await exiting


@asynccontextmanager
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=BOUND_S) as client:
        yield client


async def redis_now_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def record(redis: Any, keys: TaskKeys, task_id: int) -> dict[str, str]:
    raw = await redis.hgetall(keys.record(task_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def wait_until_overdue(redis: Any, keys: TaskKeys, task_id: int) -> None:
    """Until Redis's clock is OVERDUE_MARGIN_MS past the task's deadline_ms (a bounded wait)."""
    deadline = int((await record(redis, keys, task_id))["deadline_ms"])
    async with asyncio.timeout(BOUND_S):
        while await redis_now_ms(redis) < deadline + OVERDUE_MARGIN_MS:
            await asyncio.sleep(0.1)


async def wait_finished(producer: Producer, task_id: int, bound_s: float) -> Task:
    """The task once it is completed or failed; AssertionError if that takes over `bound_s`."""
    task = await producer.get(task_id)
    try:
        async with asyncio.timeout(bound_s):
            while not task.is_terminal:
                await asyncio.sleep(0.05)
                task = await producer.get(task_id)
    except TimeoutError:
        raise AssertionError(f"task {task_id} still {task.status} v{task.version} after "
                             f"{bound_s} s") from None
    return task


def assert_timed_out(task: Task | dict[str, Any], timeout_s: int) -> None:
    if isinstance(task, Task):
        status, message = task.status, task.error_message
    else:
        status, message = task["status"], task["error_message"]
    assert status == TaskStatus.FAILED
    assert message, "a timed-out task needs an error_message"
    assert "timed out" in message
    assert f"{timeout_s} s" in message


async def metric_sum(clients: list[httpx.AsyncClient], name: str, **labels: str) -> float:
    return sum([await read_metric(client, name, **labels) or 0.0 for client in clients])


async def follow_ready(client: httpx.AsyncClient, task_id: int) -> Follower:
    follower = Follower(client, f"/tasks/{task_id}/events", expect=[task_id]).start()
    try:
        async with asyncio.timeout(BOUND_S):
            await follower.ready.wait()
    except TimeoutError:
        await follower.stop()
        raise AssertionError(f"no first state: {follower.transcript.summary()}") from None
    return follower


async def recheck_until_each_saw_it_finished(redis: Any, keys: TaskKeys, task_ids: list[int],
                                             clients: list[httpx.AsyncClient],
                                             at_least: int) -> None:
    """Put the finished tasks back into the timeout index, due now (stale entries, as a
    producer that died before its ZREM leaves), until each gateway of `clients` has answered
    "finished" `at_least` times. A gateway's sweeps run one after the other, so by then none
    of its checks from before the failure is still under way; the tasks must not change."""
    answers: list[float] = []
    try:
        async with asyncio.timeout(BOUND_S):
            while min(answers := [await read_metric(c, CHECKS, answer="finished") or 0.0
                                  for c in clients]) < at_least:
                for task_id in task_ids:
                    member = str(task_id)
                    if await redis.zscore(keys.timeouts_of(task_id), member) is None:
                        await redis.zadd(keys.timeouts_of(task_id), {member: 0})
                await asyncio.sleep(0.05)
    except TimeoutError:
        timed_out = [await read_metric(c, TIMED_OUT) for c in clients]
        raise AssertionError(f"the gateways answered \"finished\" {answers} times, not "
                             f"{at_least} each; tasks timed out per gateway: {timed_out}"
                             ) from None


def statuses(transcript: Transcript) -> list[tuple[int, str]]:
    return [(task["version"], task["status"]) for task in transcript.tasks()]


# -- single Redis --------------------------------------------------------------------------------


async def test_two_gateways_fail_an_abandoned_task_once_and_publish_it(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers" (a dead worker's task stays processing forever, watchers stay
    connected forever), with N gateways the failure written once (issue 12, timeouts)."""
    keys, task_id, timeout_s = TaskKeys(prefix), 7, 2
    settings = sweeping(redis_server.url, prefix)
    async with gateway_on(settings) as gw_a, gateway_on(settings) as gw_b, \
            http(gw_a) as client_a, http(gw_b) as client_b, \
            subscribed(redis, [keys.channel(task_id)], BOUND_S) as channel:
        await producer.create(task_id=task_id, timeout_s=timeout_s)
        follower = await follow_ready(client_a, task_id)
        try:
            transcript = await follower.result(timeout_s + GRACE_S)
        finally:
            await follower.stop()
        # Each gateway finds the failed task again (a stale entry put back) and must leave it
        # alone; once both have, no check from before the failure is still under way.
        await recheck_until_each_saw_it_finished(redis, keys, [task_id], [client_a, client_b],
                                                 at_least=1)
        published = [orjson.loads(message) for message in await channel.drain()]
        timed_out = await metric_sum([client_a, client_b], TIMED_OUT)

    assert stream_problems(transcript, [task_id]) == []
    assert statuses(transcript) == [(1, "submitted"), (2, "failed")]
    assert_timed_out(transcript.tasks()[-1], timeout_s)
    assert [(event["version"], event["status"]) for event in published] == [
        (1, "submitted"), (2, "failed")]
    assert published[-1] == transcript.tasks()[-1]  # published like any change
    stored = await record(redis, keys, task_id)
    assert stored["version"] == "2" and stored["status"] == "failed"
    assert "deadline_ms" not in stored
    assert timed_out == 1


async def test_progress_keeps_a_task_alive_until_it_stops(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers": only a worker that stopped reporting is timed out; each accepted
    change moves the deadline."""
    keys, timeout_s = TaskKeys(prefix), 2
    async with gateway_on(sweeping(redis_server.url, prefix)) as gateway, \
            http(gateway) as client:
        task = await producer.create(timeout_s=timeout_s)
        created_at = int((await record(redis, keys, task.task_id))["created_at"])
        for step in range(1, 7):  # ~3 s: past the first deadline, never 2 s without a change
            await asyncio.sleep(0.5)
            task = await producer.progress(task.task_id, step * 10)
        assert await redis_now_ms(redis) > created_at + timeout_s * 1000  # first deadline gone
        alive = await producer.get(task.task_id)
        assert (alive.status, alive.progress, alive.version) == (TaskStatus.PROCESSING, 60, 7)
        assert await read_metric(client, TIMED_OUT) in (None, 0.0)

        # The worker stops reporting: now the task times out.
        failed = await wait_finished(producer, task.task_id, timeout_s + GRACE_S)
        assert await read_metric(client, TIMED_OUT) == 1
    assert_timed_out(failed, timeout_s)
    assert (failed.progress, failed.version) == (60, 8)


async def test_a_task_completed_in_time_is_never_failed_and_leaves_the_index(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers": the sweep fails only unfinished tasks; a finished task's entry in
    P:timeouts:{id % 16} goes away (the producer removes it, or the sweep drops a stale one)."""
    keys, timeout_s = TaskKeys(prefix), 1
    async with gateway_on(sweeping(redis_server.url, prefix)) as gateway, \
            http(gateway) as client:
        done = await producer.create(timeout_s=timeout_s)
        bucket = keys.timeouts_of(done.task_id)
        assert await redis.zscore(bucket, str(done.task_id)) is not None  # indexed on create
        async with subscribed(redis, [keys.channel(done.task_id)], BOUND_S) as channel:
            completed = await producer.complete(done.task_id,
                                                image_url="https://cdn.example/x.png")
            assert await redis.zscore(bucket, str(done.task_id)) is None  # the producer's ZREM
            # A stale entry, as a producer that died between the script and its ZREM leaves.
            await redis.zadd(bucket, {str(done.task_id): 0})
            # A witness with the same timeout, created later: once it has timed out, the
            # completed task's deadline has passed and the sweep has looked at it.
            witness = await producer.create(timeout_s=timeout_s)
            witnessed = await wait_finished(producer, witness.task_id, timeout_s + GRACE_S)
            assert_timed_out(witnessed, timeout_s)
            async with asyncio.timeout(BOUND_S):
                while await redis.zscore(bucket, str(done.task_id)) is not None:
                    await asyncio.sleep(0.05)
            published = await channel.drain()
        assert await read_metric(client, CHECKS, answer="finished") == 1
        assert await read_metric(client, TIMED_OUT) == 1  # the witness only
    assert [orjson.loads(message) for message in published] == [completed.to_dict()]
    assert await producer.get(done.task_id) == completed
    assert completed.status == TaskStatus.COMPLETED and completed.version == 2


async def test_a_shorter_timeout_given_in_an_update_is_honoured(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers": `timeout_s` is allowed on update (contract 8) and a shorter one
    takes effect, although the create indexed the task ten minutes out."""
    keys = TaskKeys(prefix)
    async with gateway_on(sweeping(redis_server.url, prefix)):
        task = await producer.create(timeout_s=600)
        bucket = keys.timeouts_of(task.task_id)
        first_hint = await redis.zscore(bucket, str(task.task_id))
        assert first_hint is not None
        updated = await producer.progress(task.task_id, 10, timeout_s=1)
        assert updated.version == 2
        second_hint = await redis.zscore(bucket, str(task.task_id))
        assert second_hint is not None and second_hint < first_hint
        assert (await record(redis, keys, task.task_id))["timeout_s"] == "1"
        failed = await wait_finished(producer, task.task_id, 1 + GRACE_S)
    assert_timed_out(failed, 1)
    assert failed.version == 3


async def test_an_unfinished_record_has_a_backstop_expiry_and_needs_a_gateway_to_time_out(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers" (the record never expires): an unfinished record expires
    timeout_s + 86400 s after its last change; without a gateway nothing fails an overdue task,
    and the first gateway that starts does."""
    keys, timeout_s = TaskKeys(prefix), 1
    task = await producer.create(timeout_s=timeout_s)
    ttl = await redis.ttl(keys.record(task.task_id))
    assert timeout_s + BACKSTOP_S - 5 <= ttl <= timeout_s + BACKSTOP_S
    later = await producer.progress(task.task_id, 5, timeout_s=300)  # moved by each change
    ttl = await redis.ttl(keys.record(task.task_id))
    assert 300 + BACKSTOP_S - 5 <= ttl <= 300 + BACKSTOP_S

    overdue = await producer.create(timeout_s=timeout_s)
    await wait_until_overdue(redis, keys, overdue.task_id)
    stored = await record(redis, keys, overdue.task_id)
    assert (stored["status"], stored["version"]) == ("submitted", "1")
    assert await producer.get(task.task_id) == later

    async with gateway_on(sweeping(redis_server.url, prefix)):
        failed = await wait_finished(producer, overdue.task_id, timeout_s + GRACE_S)
    assert_timed_out(failed, timeout_s)
    assert failed.version == 2
    ttl = await redis.ttl(keys.record(overdue.task_id))
    assert BACKSTOP_S - 5 <= ttl <= BACKSTOP_S  # now the retention of a finished task
    assert "deadline_ms" not in await record(redis, keys, overdue.task_id)


async def test_timeout_sweep_zero_disables_the_sweep_on_that_gateway(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers": TASKCAST_TIMEOUT_SWEEP_S=0 leaves timeouts to other gateways;
    that gateway still delivers the failure another one writes."""
    keys, timeout_s = TaskKeys(prefix), 1
    async with gateway_on(sweeping(redis_server.url, prefix, 0)) as quiet, \
            http(quiet) as client:
        task = await producer.create(timeout_s=timeout_s)
        await producer.progress(task.task_id, 10)
        bucket = keys.timeouts_of(task.task_id)
        hint = await redis.zscore(bucket, str(task.task_id))
        follower = await follow_ready(client, task.task_id)
        try:
            await wait_until_overdue(redis, keys, task.task_id)
            stored = await record(redis, keys, task.task_id)
            assert (stored["status"], stored["version"]) == ("processing", "2")
            assert await redis.zscore(bucket, str(task.task_id)) == hint  # nobody looked
            assert await read_metric(client, CHECKS, answer="not_due") is None

            async with gateway_on(sweeping(redis_server.url, prefix)):
                transcript = await follower.result(timeout_s + GRACE_S)
        finally:
            await follower.stop()
        assert await read_metric(client, TIMED_OUT) in (None, 0.0)
    assert stream_problems(transcript, [task.task_id]) == []
    assert statuses(transcript) == [(2, "processing"), (3, "failed")]
    assert_timed_out(transcript.tasks()[-1], timeout_s)


async def test_a_create_that_finds_its_id_taken_does_not_postpone_that_tasks_timeout(
    redis_server: RedisServer, redis: aioredis.Redis, producer: Producer, prefix: str
) -> None:
    """Finding "Dead workers" with the one of "Producer and record bugs" (explicit ids mixed
    with allocated ones): a create that ends in EXISTS, or skips an allocated id that is taken,
    must not move the existing task's timeout index entry an hour out (its own default
    timeout_s), or that task is not failed within timeout_s + 10 s."""
    keys, timeout_s = TaskKeys(prefix), 1
    async with gateway_on(sweeping(redis_server.url, prefix)):
        taken_by_incr = await producer.create(task_id=1, timeout_s=timeout_s)
        taken_explicitly = await producer.create(task_id=10, timeout_s=timeout_s)
        allocated = await producer.create()  # INCR gives 1: taken, so the next id
        assert allocated.task_id == 2
        with pytest.raises(TransitionRejected) as refused:
            await producer.create(task_id=10)
        assert refused.value.reason == "EXISTS"
        hints = {t.task_id: await redis.zscore(keys.timeouts_of(t.task_id), str(t.task_id))
                 for t in (taken_by_incr, taken_explicitly)}
        failed = [await wait_finished(producer, t.task_id, timeout_s + GRACE_S)
                  for t in (taken_by_incr, taken_explicitly)]
    for task in failed:
        assert_timed_out(task, timeout_s)
        assert task.version == 2, hints
    assert (await producer.get(allocated.task_id)).status == TaskStatus.SUBMITTED


class HoldingProxy:
    """A plain TCP relay to a redis-server that holds the first script call (EVALSHA) a client
    sends until the test releases it: a producer paused between its two round trips."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._armed = True
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        async with asyncio.timeout(BOUND_S):
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for pipe in (self._pipe(reader, up_writer, hold=True),
                     self._pipe(up_reader, writer, hold=False)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *,
                    hold: bool) -> None:
        try:
            while data := await source.read(65536):
                if hold and self._armed and b"\r\nEVALSHA\r\n" in data[:32]:
                    self._armed = False
                    self.held.set()
                    await self.release.wait()
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()


async def test_a_sweep_between_the_index_entry_and_the_create_does_not_lose_the_task(
    redis_server: RedisServer, redis: aioredis.Redis, prefix: str
) -> None:
    """Finding "Dead workers": the producer indexes a task before creating it; a sweep that
    looks in between finds no record ("gone"). The task created right after must still time
    out: a producer paused for a moment must not leave a task that is never failed."""
    keys, task_id, timeout_s = TaskKeys(prefix), 3, 1
    async with gateway_on(sweeping(redis_server.url, prefix)) as gateway, \
            http(gateway) as client, HoldingProxy(redis_server.port) as proxy:
        producer = Producer(connect(proxy.url, timeout=BOUND_S), prefix=prefix)
        try:
            creating = asyncio.create_task(producer.create(task_id=task_id, timeout_s=timeout_s))
            async with asyncio.timeout(BOUND_S):
                await proxy.held.wait()  # indexed, the create not yet sent on
                assert await redis.zscore(keys.timeouts_of(task_id), str(task_id)) is not None
                while not await read_metric(client, CHECKS, answer="gone"):
                    await asyncio.sleep(0.05)  # a sweep looked at the entry and found no task
            proxy.release.set()
            async with asyncio.timeout(BOUND_S):
                created = await creating
            assert created.version == 1
            failed = await wait_finished(producer, task_id, timeout_s + GRACE_S)
        finally:
            async with asyncio.timeout(BOUND_S):
                await producer.close()
    assert_timed_out(failed, timeout_s)
    assert failed.version == 2


async def test_a_gateway_stops_while_its_timeout_sweep_is_busy(
    redis_server: RedisServer, prefix: str
) -> None:
    """Finding "Dead workers": the timeout sweep every gateway now runs must not keep the
    gateway from stopping. A sweep every millisecond keeps the sweeper inside Redis calls, so a
    stop lands in one: each stop must still end within STOP_BOUND_S."""
    stuck: list[str] = []
    for _ in range(10):
        async with gateway_on(sweeping(redis_server.url, prefix, 0.001), stuck) as gateway:
            assert len(sweeper_tasks(gateway)) == 1
            await asyncio.sleep(0.05)  # a few dozen sweeps
        if stuck:
            break
    assert stuck == []


# -- Redis Cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timeout_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """One three-primary cluster for this module, started as tests/test_cluster.py does."""
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("timeout-cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


async def test_tasks_time_out_once_on_a_redis_cluster(
    timeout_cluster: RedisClusterNodes, prefix: str
) -> None:
    """Finding "Dead workers" on a Redis Cluster: tasks whose records and timeout buckets live
    on different primaries are all failed once, and a watcher gets the failure (SPUBLISH)."""
    cluster, keys, timeout_s = timeout_cluster, TaskKeys(prefix), 1
    layout = await Layout.read(cluster)
    task_ids = sorted(itertools.chain(*(await spread_task_ids(layout, keys, 4)).values()))
    record_owners = {(await layout.owner(keys.record(t))).port for t in task_ids}
    bucket_owners = {(await layout.owner(keys.timeouts_of(t))).port for t in task_ids}
    assert len(record_owners) == 3 and len(bucket_owners) >= 2
    assert len({t % 16 for t in task_ids}) >= 6

    producer = Producer.from_url(cluster.url, prefix=prefix)
    try:
        # No periodic re-read within the test: only the failure's event (SPUBLISH) delivers it.
        settings = sweeping(cluster.url, prefix).with_changes(resync_interval_s=600.0)
        async with gateway_on(settings) as gateway, \
                http(gateway) as client:
            async with asyncio.timeout(BOUND_S):
                assert (await client.get("/readyz")).status_code == 200
            # The watched task gets a second more, to be watched before it is due.
            watched = task_ids[0]
            await producer.create(task_id=watched, timeout_s=timeout_s + 1)
            follower = await follow_ready(client, watched)
            try:
                for task_id in task_ids[1:]:
                    await producer.create(task_id=task_id, timeout_s=timeout_s)
                transcript = await follower.result(timeout_s + 1 + GRACE_S)
            finally:
                await follower.stop()
            finals = {t: await wait_finished(producer, t, timeout_s + GRACE_S)
                      for t in task_ids}
            await recheck_until_each_saw_it_finished(producer.redis, keys, task_ids, [client],
                                                     at_least=len(task_ids))
            finals_later = {t: await producer.get(t) for t in task_ids}
            timed_out = await read_metric(client, TIMED_OUT)
    finally:
        async with asyncio.timeout(BOUND_S):
            await producer.close()

    assert stream_problems(transcript, [watched]) == []
    assert statuses(transcript) == [(1, "submitted"), (2, "failed")]
    assert_timed_out(transcript.tasks()[-1], timeout_s + 1)
    assert transcript.tasks()[-1] == finals[watched].to_dict()
    for task_id in task_ids:
        assert_timed_out(finals[task_id], timeout_s + 1 if task_id == watched else timeout_s)
        assert finals[task_id].version == 2, task_id
    assert finals_later == finals
    assert timed_out == len(task_ids)
