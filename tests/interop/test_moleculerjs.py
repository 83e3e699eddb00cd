"""Moleculer.js 0.14 and a moleculerpy-cqrs node on one cluster, over a real NATS server.

The Python node (in this process) serves the profile example on SQLite files; the Node script
``node/client.mjs`` (a real Moleculer.js broker, from npm) calls ``profile.update``, listens to
``profile.updated``, reads the summary aggregate with ``find`` and ``list`` and provokes the
errors a Moleculer.js caller must be able to tell apart by name and code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from moleculerpy import Context, Service, ServiceBroker, event

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.profile_example import build

README = Path(__file__).resolve().parents[2] / "README.md"

JS_NODE = "js-node"
UPDATES = 30
COUNTRIES = ("NZ", "AU", "US")  # as client.mjs assigns them: index % 3

NOT_FOUND_NAMES = {"EntityNotFoundError"}
"""moleculer-db's name is ``EntityNotFoundError``; ours is being renamed to it. Once it is,
this becomes ``{"EntityNotFoundError"}``."""


class JsNode:
    """The Node script as a child process: JSON lines out, commands in."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()

    async def receive(self, key: str, within: float = 30.0) -> Any:
        """The value of the next message, which must carry ``key``."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise AssertionError(f"the Node script ended: {await self._stderr()}")
        message = json.loads(line)
        assert key in message, message
        return message[key]

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        await self.process.wait()
        return (await self.process.stderr.read()).decode(errors="replace")[-3000:]


@asynccontextmanager
async def js_node(node_dir: Path, nats_url: str, count: int) -> AsyncIterator[JsNode]:
    process = await asyncio.create_subprocess_exec(
        "node", str(node_dir / "client.mjs"), nats_url, str(count),
        cwd=node_dir,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield JsNode(process)
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def _subscribes(broker: ServiceBroker, node_id: str, event: str) -> bool:
    node = broker.node_catalog.get_node(node_id)
    if node is None or not node.available:
        return False
    return any(
        event in (service.get("events") or {})
        for service in node.services
        if isinstance(service, dict)
    )


async def until_subscribed(
    broker: ServiceBroker, node_id: str, event: str, within: float = 20.0
) -> None:
    """Until ``broker``'s registry shows ``node_id`` listening to ``event`` (it learns that
    from the node's INFO packets, announced with ``$node.updated``)."""
    changed = asyncio.Event()

    def on_change(_payload: Any) -> None:
        changed.set()

    broker.local_bus.on("$node.*", on_change)
    try:
        async with asyncio.timeout(within):
            while not _subscribes(broker, node_id, event):
                changed.clear()
                await changed.wait()
    finally:
        broker.local_bus.off("$node.*", on_change)


class PyWatcher(Service):
    """A Python subscriber beside the Node one: each service hears each event once."""

    name = "pyWatcher"

    def __init__(self) -> None:
        super().__init__()
        self.heard: Counter[int] = Counter()

    @event(name="profile.updated")
    async def on_updated(self, ctx: Context) -> None:
        self.heard[int(ctx.params["id"])] += 1


async def test_a_moleculerjs_node_on_the_same_cluster(
    tmp_path: Path, nats_url: str, node_dir: Path
) -> None:
    events, summary, service = build(stores.sqlite(tmp_path))
    watcher = PyWatcher()
    async with (
        running_broker(service(), watcher, transporter=nats_url, node_id="py-node") as broker,
        js_node(node_dir, nats_url, UPDATES) as js,
    ):
        assert await js.receive("started") == JS_NODE
        await until_subscribed(broker, JS_NODE, "profile.updated")
        await js.send("go")
        saved = await js.receive("saved")
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 30)
        await asyncio.wait_for(events.runtime(broker).dispatcher.wait_settled(UPDATES), 30)
        await js.send("read")
        report = await js.receive("report")
        head = await events.runtime(broker).adapter.head()
        await js.send("stop")
        assert await asyncio.wait_for(js.process.wait(), 10) == 0

    ids = [answer["id"] for answer in saved]
    assert [answer["event"] for answer in saved] == ["profile.updated"] * UPDATES
    assert sorted(ids) == list(range(1, UPDATES + 1))
    assert saved[0]["payload"] == {"name": "js-0", "country": "NZ", "married": True,
                                   "student": True}  # fmt: skip
    # Each stored event reached the Moleculer.js subscriber exactly once.
    assert {int(k): v for k, v in report["heard"].items()} == dict.fromkeys(ids, 1)
    # And the Python one too (the keyed command, stored later, may or may not be heard yet).
    assert {k: n for k, n in watcher.heard.items() if k in ids} == dict.fromkeys(ids, 1)
    assert set(watcher.heard) <= {*ids, report["keyed"]["first"]["id"]}
    assert report["eventStore"]["dispatcher"]["lag"] == 0

    per_country = Counter(COUNTRIES[i % 3] for i in range(UPDATES))
    (nz,) = report["found"]
    assert (nz["country"], nz["total"]) == ("NZ", per_country["NZ"])
    first, second = report["pages"]
    assert [row["country"] for row in first["rows"] + second["rows"]] == sorted(per_country)
    assert (first["total"], first["page"], first["pageSize"], first["totalPages"]) == (3, 1, 2, 2)
    assert (second["page"], len(second["rows"])) == (2, 1)
    assert report["count"] == 3

    invalid, missing = report["invalid"], report["missing"]
    assert (invalid["name"], invalid["code"]) == ("ValidationError", 422)
    assert "colour" in invalid["message"]
    assert missing["name"] in NOT_FOUND_NAMES, missing
    assert missing["code"] == 404
    assert "999999" in missing["message"]

    keyed = report["keyed"]
    assert keyed["again"]["id"] == keyed["first"]["id"]
    assert keyed["again"]["payload"] == {"name": "js-keyed", "country": "NZ"}
    conflict = keyed["conflict"]
    assert (conflict["name"], conflict["code"]) == ("ConflictError", 409), conflict
    assert "js-order-1" in conflict["message"]
    assert head == UPDATES + 1  # the keyed command was stored once


async def test_a_moleculerjs_subscriber_hears_the_upcast_shape(
    tmp_path: Path, nats_url: str, node_dir: Path
) -> None:
    """A v1 event in the log (as the v1 code stored it) reaches a Moleculer.js subscriber of
    the v2 node as v2: the dispatcher emits what the upcasters read."""
    events, summary, service = build(stores.sqlite(tmp_path), version=2)
    async with (
        running_broker(service(), transporter=nats_url, node_id="py-node") as broker,
        js_node(node_dir, nats_url, 0) as js,
    ):
        assert await js.receive("started") == JS_NODE
        await until_subscribed(broker, JS_NODE, "profile.updated")
        runtime = events.runtime(broker)
        old = await runtime.append("profile.updated", {"name": "Old", "country": "NZ"}, version=1)
        new = await broker.call("profile.update", {"fullName": "New", "address": {"country": "AU"}})
        await js.send("go")
        assert await js.receive("saved") == []
        await asyncio.wait_for(runtime.dispatcher.wait_settled(new["id"]), 30)
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 30)
        await js.send("read")
        report = await js.receive("report")
        await js.send("stop")
        assert await asyncio.wait_for(js.process.wait(), 10) == 0
        stored = await broker.call("profileEventStore.get", {"id": old["id"], "raw": True})

    def v2(name: str, country: str) -> dict[str, Any]:
        return {"version": 2, "payload": {"fullName": name, "address": {"country": country}}}

    assert report["shapes"] == {str(old["id"]): v2("Old", "NZ"), str(new["id"]): v2("New", "AU")}
    assert (stored["version"], stored["payload"]) == (1, {"name": "Old", "country": "NZ"})
    (nz,) = report["found"]  # the v2 transformation counted the v1 event
    assert (nz["country"], nz["total"]) == ("NZ", 1)


async def test_the_readmes_node_example_runs(tmp_path: Path, nats_url: str, node_dir: Path) -> None:
    (block,) = re.findall(r"```js\n(.*?)```", README.read_text(), flags=re.DOTALL)
    script = tmp_path / "readme.mjs"
    script.write_text(block)
    (tmp_path / "node_modules").symlink_to(node_dir / "node_modules")
    _, summary, service = build(stores.sqlite(tmp_path / "data"))
    async with running_broker(service(), transporter=nats_url, node_id="py-node") as broker:
        await broker.call("profile.update", {"name": "Bo", "country": "AU"})
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 30)
        node = await asyncio.create_subprocess_exec(
            "node", str(script),
            cwd=tmp_path,
            env={**os.environ, "TRANSPORTER": nats_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(node.communicate(), 60)
        assert node.returncode == 0, err.decode()
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 30)
        rows = await broker.call("profileSummaryAggregate.find", {"country": "NZ"})

    printed = [line for line in out.decode().splitlines() if not line.startswith("heard ")]
    assert printed[:2] == ["saved profile.updated 0 true", "page 1 of 1"]
    name, code = printed[2].split()
    assert (name in NOT_FOUND_NAMES, code) == (True, "404")
    assert [row["total"] for row in rows] == [1]  # Ann was stored (once) and projected
