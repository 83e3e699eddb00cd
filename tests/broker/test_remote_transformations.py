"""Transformations served only by another node, over a real NATS server: many events go in one
request (``$cqrs.callMany``), and log order, exactly-once, retries, dead letters and halting
hold as for a local transformation (see ``core/remote.py``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
from moleculerpy import Context, Service, ServiceBroker, Settings, action

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.broker import compat
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.nats_server import NatsServer

REPO = Path(__file__).resolve().parents[2]
COUNTRIES = ("NZ", "FR", "JP", "BR", "KE")
ROW_FIELDS = {"name": "string", "country": "string", "n": "integer"}
SUMMARY_FIELDS = {"country": "string", "total": "integer", "last": "integer"}


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:
        yield server.url


@asynccontextmanager
async def transformer_node(url: str, service: Service) -> AsyncIterator[ServiceBroker]:
    """A node that serves transformations only: a plain service, and ``compat.install``."""
    broker = ServiceBroker(
        "node-b", settings=Settings(transporter=url, log_level="ERROR", request_timeout=10)
    )
    compat.install(broker)
    await broker.register(service)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


class Reads:
    """Counts the reads of the aggregate that reach the projector's node (a middleware)."""

    def __init__(self, action_name: str) -> None:
        self.action_name = action_name
        self.count = 0

    def local_action(self, handler: Any, action: Any) -> Any:
        if getattr(action, "name", None) != self.action_name:
            return handler

        async def counted(ctx: Context) -> Any:
            self.count += 1
            return await handler(ctx)

        return counted


def projector_side(
    tmp_path: Path, kind: Literal["create", "summary"], key: str | None, **options: Any
) -> tuple[EventStore, Aggregate, Service]:
    events = EventStore("profileEventStore", stores.sqlite(tmp_path / "log"))
    fields = ROW_FIELDS if kind == "create" else SUMMARY_FIELDS
    agg = Aggregate(
        "profileView", stores.sqlite(tmp_path / "view", fields=fields), batch_size=500, **options
    ).snapshot("profileEventStore")
    on = agg.on("profile.updated")
    if kind == "create":
        on.create("summarizer.transform", key=key)
    else:
        on.update("summarizer.transform", key=key)

    class Writer(events.mixin(), agg.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated")

    return events, agg, Writer()


class Summarizer(Service):
    """The transformations, on node B. ``fail`` names events that always fail; ``hang`` one
    whose first call never answers."""

    name = "summarizer"

    def __init__(self, kind: str, fail: set[int] = frozenset(), hang: int | None = None) -> None:  # type: ignore[assignment]
        super().__init__(self.name)
        self.kind = kind
        self.fail = fail
        self.hang = hang
        self.items: list[Any] = []  # the $cqrsItem of every call
        self.release = asyncio.Event()  # ends the hung call (the test is over)

    @action(name="transform")
    async def transform(self, ctx: Context) -> Any:
        self.items.append(ctx.meta.get("$cqrsItem"))
        p = ctx.params["payload"]
        if p["n"] in self.fail:
            raise ValueError(f"event {p['n']} is bad")
        if p["n"] == self.hang:
            self.hang = None
            await self.release.wait()
        if self.kind == "create":
            return {"name": p["name"], "country": p["country"], "n": p["n"]}
        if self.kind == "mixed" and p["n"] % 3:
            return None  # reads nothing, changes nothing
        found = await ctx.call("profileView.find", {"query": {"country": p["country"]}})
        if found:
            return {"id": found[0]["id"], "total": found[0]["total"] + 1, "last": p["n"]}
        return {"country": p["country"], "total": 1, "last": p["n"]}


def profile(n: int) -> dict[str, Any]:
    return {"name": f"p{n}", "country": COUNTRIES[(n * 7) % 5], "n": n}


async def feed(broker: ServiceBroker, count: int) -> None:
    for start in range(0, count, 50):
        await asyncio.gather(
            *(broker.call("profile.update", profile(n)) for n in range(start, start + 50))
        )


def expected_summary(numbers: list[int]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for n in numbers:
        country = profile(n)["country"]
        out[country] = (out.get(country, (0, 0))[0] + 1, n)
    return out


async def test_create_only_events_travel_many_in_one_request(tmp_path: Path, nats_url: str) -> None:
    _, agg, writer = projector_side(tmp_path, "create", None)
    summarizer = Summarizer("create")
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, summarizer),
    ):
        await feed(a, 400)
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 30)
        rows = await a.call("profileView.find", {"sort": "id"})
    assert [r["n"] for r in rows] == list(range(400))  # each once, in log order
    assert max(i for i in summarizer.items if i is not None) > 0  # several in one request


async def test_without_a_key_every_event_sees_the_earlier_ones(
    tmp_path: Path, nats_url: str
) -> None:
    """Every call reads the aggregate: a request is cut before its second call, which is
    sent again first in the next one; the totals and the last event of each country are
    those of the log, in order."""
    _, agg, writer = projector_side(tmp_path, "summary", None)
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, Summarizer("summary")),
    ):
        await feed(a, 300)
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
        rows = await a.call("profileView.find", {})
        dead = await a.call("profileView.deadLetters", {})
    assert dead["total"] == 0, dead["rows"][:1]
    got = {r["country"]: (r["total"], r["last"]) for r in rows}
    assert got == expected_summary(list(range(300)))


async def test_without_a_key_calls_that_read_now_and_then_see_the_earlier_ones(
    tmp_path: Path, nats_url: str
) -> None:
    """Every third event reads: requests are cut at varying places."""
    _, agg, writer = projector_side(tmp_path, "summary", None)
    summarizer = Summarizer("mixed")
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, summarizer),
    ):
        await feed(a, 600)
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
        rows = await a.call("profileView.find", {})
    got = {r["country"]: (r["total"], r["last"]) for r in rows}
    assert got == expected_summary([n for n in range(600) if n % 3 == 0])
    assert max(i for i in summarizer.items if i is not None) > 1


class Relay(Service):
    """On node B: a transformation that reads the aggregate through a service of node C."""

    name = "summarizer"

    @action(name="transform")
    async def transform(self, ctx: Context) -> Any:
        p = ctx.params["payload"]
        found = await ctx.call("reader.lookup", {"country": p["country"]})
        if found:
            return {"id": found[0]["id"], "total": found[0]["total"] + 1, "last": p["n"]}
        return {"country": p["country"], "total": 1, "last": p["n"]}


class Reader(Service):
    name = "reader"

    @action(name="lookup")
    async def lookup(self, ctx: Context) -> Any:
        return await ctx.call("profileView.find", {"query": {"country": ctx.params["country"]}})


async def test_without_a_key_a_read_through_a_third_node_is_not_trusted(
    tmp_path: Path, nats_url: str
) -> None:
    """Node B's transformation reads the aggregate through node C: B cannot record those
    reads, so the projector's node notes them (they carry the call's place and no mark of
    B's), and uses the answer of no call that made one after the first of its request."""
    _, agg, writer = projector_side(tmp_path, "summary", None)
    settings = Settings(transporter=nats_url, log_level="ERROR")
    c = ServiceBroker("node-c", settings=settings)
    compat.install(c)
    await c.register(Reader())
    await c.start()
    try:
        async with (
            running_broker(writer, node_id="node-a", transporter=nats_url) as a,
            transformer_node(nats_url, Relay()),
        ):
            await feed(a, 300)
            await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
            rows = await a.call("profileView.find", {})
    finally:
        await c.stop()
    got = {r["country"]: (r["total"], r["last"]) for r in rows}
    assert got == expected_summary(list(range(300)))


async def test_keyed_reads_are_answered_from_the_rows_sent_along(
    tmp_path: Path, nats_url: str
) -> None:
    reads = Reads("profileView.find")
    _, agg, writer = projector_side(tmp_path, "summary", "country")
    settings = Settings(transporter=nats_url, log_level="ERROR", middlewares=[reads])
    a = ServiceBroker("node-a", settings=settings)
    await a.register(writer)
    await a.start()
    try:
        async with transformer_node(nats_url, Summarizer("summary")):
            await feed(a, 300)
            await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
            rows = await a.call("profileView.find", {})
    finally:
        await a.stop()
    got = {r["country"]: (r["total"], r["last"]) for r in rows}
    assert got == expected_summary(list(range(300)))
    assert reads.count <= 1, f"{reads.count} reads came back to the projector's node"


@pytest.mark.parametrize("key", [None, "country"])
async def test_one_failing_event_in_a_request_is_dead_lettered_alone(
    tmp_path: Path, nats_url: str, key: str | None
) -> None:
    _, agg, writer = projector_side(tmp_path, "create", key)
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, Summarizer("create", fail={37, 38})),
    ):
        await feed(a, 200)
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 30)
        rows = await a.call("profileView.find", {})
        dead = await a.call("profileView.deadLetters", {})
    assert sorted(r["n"] for r in rows) == [n for n in range(200) if n not in (37, 38)]
    assert sorted(d["record"]["payload"]["n"] for d in dead["rows"]) == [37, 38]


async def test_halt_mode_stops_at_the_failing_event_of_a_request(
    tmp_path: Path, nats_url: str
) -> None:
    _, agg, writer = projector_side(tmp_path, "create", None, on_error="halt")
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, Summarizer("create", fail={120})),
    ):
        await feed(a, 200)
        projector = agg.runtime(a).projector
        assert projector is not None
        await asyncio.wait_for(projector.wait_halted(), 30)
        rows = await a.call("profileView.find", {})
    assert sorted(r["n"] for r in rows) == list(range(120))


async def test_a_request_that_never_answers_is_retried_one_event_at_a_time(
    tmp_path: Path, nats_url: str
) -> None:
    """The serving node takes a request and never answers it (as a node that died would):
    the projector's request times out, each of its events is called again on its own, and
    every event is applied exactly once."""
    _, agg, writer = projector_side(tmp_path, "create", "country")
    async with running_broker(
        writer, node_id="node-a", transporter=nats_url, request_timeout=1.0
    ) as a:
        summarizer = Summarizer("create", hang=5)
        async with transformer_node(nats_url, summarizer):
            await feed(a, 200)
            await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
            rows = await a.call("profileView.find", {})
            dead = await a.call("profileView.deadLetters", {})
            summarizer.release.set()
    assert dead["total"] == 0
    assert sorted(r["n"] for r in rows) == list(range(200))


async def test_a_node_that_dies_mid_request_leaves_its_events_to_the_others(
    tmp_path: Path, nats_url: str
) -> None:
    """A node is killed (SIGKILL) while it holds a request; another serves the
    transformation too (it starts once the first holds the request: a batch's requests go to
    one node). The killed node's heartbeats stop, the projector's request fails at once (not
    at its 30 s timeout), the events are called again on the other node, and each is applied
    exactly once."""
    _, agg, writer = projector_side(tmp_path, "create", "country")
    settings = Settings(
        transporter=nats_url, log_level="ERROR", request_timeout=30,
        heartbeat_interval=0.2, heartbeat_timeout=1.0,
    )  # fmt: skip
    dying = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.broker.transformer_node", nats_url, "node-dying", "150",
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert dying.stdout is not None
    a = ServiceBroker("node-a", settings=settings)
    survivor = ServiceBroker("node-c", settings=settings)
    try:
        assert await asyncio.wait_for(dying.stdout.readline(), 30) == b"ready\n"
        await a.register(writer)
        await a.start()
        await feed(a, 300)
        assert await asyncio.wait_for(dying.stdout.readline(), 30) == b"hung\n"
        compat.install(survivor)
        await survivor.register(Summarizer("create"))
        await survivor.start()
        dying.kill()
        await dying.wait()
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 20)
        rows = await a.call("profileView.find", {})
        dead = await a.call("profileView.deadLetters", {})
    finally:
        if dying.returncode is None:
            dying.kill()
            await dying.wait()
        await a.stop()
        await survivor.stop()
    assert dead["total"] == 0, dead["rows"][:1]
    assert sorted(r["n"] for r in rows) == list(range(300))


@pytest.mark.parametrize("key", [None, "country"])
async def test_the_serving_node_carries_what_its_calls_changed_to_the_next_request(
    tmp_path: Path, nats_url: str, key: str | None
) -> None:
    """Several requests of a batch are out at once; the serving node runs them in order and
    answers a call's reads with the rows the earlier calls changed (patched from their
    answers), so that few answers are dropped for reads that no longer hold, and the totals
    and the last event of each country are those of the log."""
    _, agg, writer = projector_side(tmp_path, "summary", key)
    async with (
        running_broker(writer, node_id="node-a", transporter=nats_url) as a,
        transformer_node(nats_url, Summarizer("summary")),
    ):
        projector = agg.runtime(a).projector
        assert projector is not None
        async with projector.paused():  # then one batch of 1,000 events
            await feed(a, 1000)
        await asyncio.wait_for(agg.runtime(a).wait_caught_up(), 60)
        rows = await a.call("profileView.find", {})
        dead = await a.call("profileView.deadLetters", {})
    assert dead["total"] == 0, dead["rows"][:1]
    got = {r["country"]: (r["total"], r["last"]) for r in rows}
    assert got == expected_summary(list(range(1000)))
    assert projector.stats.sent_again <= 100, projector.stats.sent_again
