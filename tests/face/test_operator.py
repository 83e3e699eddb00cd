"""The operator's commands against a real cluster.

A private NATS server, one node started as ``cqrs run profile tests/face/ops_node.py``
in a subprocess (SQLite files under ``$CQRS_DATA``), fed through a broker in this process; each
operator command runs as ``python -m moleculerpy_cqrs.cli ...`` in a subprocess of its own, as an
operator would run it. Independent commands of one test run side by side.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import ServiceBroker, Settings
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs.broker import compat
from moleculerpy_cqrs.testing.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[2]
OPS_NODE = Path(__file__).with_name("ops_node.py")
NODE_ID = "ops-n1"
EVENT_STORES = {"profileEventStore", "opsEventStore"}
AGGREGATES = {"profileSummaryAggregate", "orderTotals", "shipments"}
PROFILES = 40
COUNTRIES = ("NZ", "AU", "US", "DE")
ORDERS = 4
POISON = 2  # the index of the shipment whose transformation fails


@dataclass(frozen=True)
class Node:
    url: str
    data: Path
    process: subprocess.Popen[bytes]


# --------------------------------------------------------------------------- the cluster


async def _wait_for_node(
    broker: ServiceBroker, process: subprocess.Popen[bytes] | None, within: float
) -> None:
    """Until ``broker`` sees every CQRS service of the node (or the node process died)."""

    def ready() -> bool:
        node = broker.node_catalog.get_node(NODE_ID)
        if node is None or not node.available:
            return False
        names = {s.get("name") for s in node.services if isinstance(s, dict)}
        return names >= EVENT_STORES | AGGREGATES

    changed = asyncio.Event()

    def on_change(_payload: Any) -> None:
        changed.set()

    broker.local_bus.on("$node.*", on_change)
    try:
        async with asyncio.timeout(within):
            while not ready():
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"the node exited with code {process.returncode}")
                changed.clear()
                try:  # wake on news, and now and then to notice a dead node
                    await asyncio.wait_for(changed.wait(), 0.5)
                except TimeoutError:
                    pass
            # MoleculerPy announces a node's services before their started() hooks ran:
            # the node is ready once each of them answers.
            for name in sorted(EVENT_STORES | AGGREGATES):
                while True:
                    try:
                        await broker.call(f"{name}.status", {})
                        break
                    except MoleculerError:
                        await asyncio.sleep(0.05)
    finally:
        broker.local_bus.off("$node.*", on_change)


def with_broker[T](
    url: str,
    work: Callable[[ServiceBroker], Awaitable[T]],
    *,
    process: subprocess.Popen[bytes] | None = None,
    within: float = 10.0,
) -> T:
    """Run ``work`` with a broker of this process that sees the node."""

    async def main() -> T:
        settings = Settings(transporter=url, log_level="ERROR", request_timeout=20.0)
        broker = ServiceBroker(f"test-{uuid.uuid4().hex[:8]}", settings=settings)
        compat.install(broker)
        await broker.start()
        try:
            await _wait_for_node(broker, process, within)
            return await work(broker)
        finally:
            await broker.stop()

    return asyncio.run(main())


async def caught_up(broker: ServiceBroker, within: float = 20.0) -> None:
    """Until every aggregate has applied the whole log and every dispatcher has delivered
    it (a bounded wait on their status)."""

    def done(status: dict[str, Any]) -> bool:
        if "dispatcher" in status:
            return bool(status["dispatcher"]["lag"] == 0)
        return bool(status["state"] == "running" and status["checkpoint"] == status["head"])

    async with asyncio.timeout(within):
        for name in sorted(EVENT_STORES | AGGREGATES):
            while True:
                if done(await broker.call(f"{name}.status", {})):
                    break
                await asyncio.sleep(0.02)


async def _feed(broker: ServiceBroker) -> None:
    for i in range(PROFILES):
        profile = {"country": COUNTRIES[i % 4], "married": i % 3 == 0, "student": i % 2 == 0}
        await broker.call("profile.update", profile)
    for i in range(ORDERS):
        await broker.call("ops.place", {"sku": f"sku{i}", "qty": i + 1})
        sku = "poison" if i == POISON else f"sku{i}"
        await broker.call("ops.ship", {"sku": sku, "qty": i + 1})
    await caught_up(broker)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    data = tmp_path_factory.mktemp("cqrs-data")
    with NatsServer() as server, (data / "node.log").open("wb") as log:
        command = [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", "profile",
                   str(OPS_NODE), "--transporter", server.url, "--node-id", NODE_ID]  # fmt: skip
        env = {**os.environ, "CQRS_DATA": str(data)}
        env.pop("TRANSPORTER", None)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            try:
                with_broker(server.url, _feed, process=process, within=30.0)
            except Exception as error:
                tail = (data / "node.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"the node did not come up: {error!r}\n{tail}") from error
            yield Node(server.url, data, process)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------- running the CLI


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        return json.loads(self.out)

    def one_error_line(self) -> str:
        """A failed command: exit code 2, nothing on stdout, one ``error:`` line on stderr."""
        assert self.code == 2, self
        assert self.out == "", self
        lines = self.err.splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("error: "), self
        return lines[0]


def cqrs(*commands: list[str], transporter: str | None = None, columns: int = 200) -> list[Run]:
    """Run ``cqrs`` commands side by side (each with ``-t transporter`` when given)."""
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("TRANSPORTER", None)
    started: list[tuple[tuple[str, ...], subprocess.Popen[str]]] = []
    for command in commands:
        full = (*command, "--transporter", transporter) if transporter else tuple(command)
        process = subprocess.Popen(
            [sys.executable, "-m", "moleculerpy_cqrs.cli", *full],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((full, process))
    runs = []
    for args, process in started:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        runs.append(Run(args, process.returncode, out, err))
    return runs


def row_of(table: str, name: str) -> list[str]:
    """The cells of the table row that names ``name``."""
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if name in cells:
            return cells
    raise AssertionError(f"no row for {name!r} in:\n{table}")


# --------------------------------------------------------------------------- the tests


def test_status_lists_every_event_store_and_aggregate_with_its_head(node: Node) -> None:
    async def statuses(broker: ServiceBroker) -> dict[str, dict[str, Any]]:
        await caught_up(broker)
        names = sorted(EVENT_STORES | AGGREGATES)
        answers = [await broker.call(f"{name}.status", {}) for name in names]
        return dict(zip(names, answers, strict=True))

    expected = with_broker(node.url, statuses)
    table, raw = cqrs(["status"], ["status", "--json"], transporter=node.url)

    assert table.code == 0, table
    for name in EVENT_STORES:
        kind, _, head, cursor, *_, lease, standby = row_of(table.out, name)
        assert (kind, int(head)) == ("event store", expected[name]["head"])
        assert (lease, standby) == (NODE_ID, "-")
        assert int(cursor) == expected[name]["dispatcher"]["cursor"]
    for name in AGGREGATES:
        kind, _, head, checkpoint, lag, _, state, dead, lease, standby = row_of(table.out, name)
        assert (kind, int(head), int(checkpoint)) == ("aggregate", expected[name]["head"],
                                                      expected[name]["checkpoint"])  # fmt: skip
        assert (lag, state, lease, standby) == ("0", "running", NODE_ID, "-")
        assert int(dead) == expected[name]["deadLetters"]
    assert expected["profileEventStore"]["head"] >= PROFILES

    answer = raw.json()
    assert {s["name"] for s in answer["eventStores"]} == EVENT_STORES
    assert {a["name"] for a in answer["aggregates"]} == AGGREGATES
    for status in answer["eventStores"] + answer["aggregates"]:
        assert status["head"] == expected[status["name"]]["head"]


def test_a_transporter_other_processes_share_is_required() -> None:
    runs = cqrs(
        ["status", "--transporter", "memory://"],
        ["snapshot", "orderTotals", "-t", "memory://", "--json"],
        ["status"],  # and no TRANSPORTER in the environment
    )
    memory, memory_json, missing = (run.one_error_line() for run in runs)
    assert "memory://" in memory
    assert "memory://" in memory_json
    assert "--transporter" in missing


def test_unknown_names_are_one_line_errors(node: Node) -> None:
    unknown, store, service = cqrs(
        ["snapshot", "nope"],
        ["snapshots", "opsEventStore", "--json"],
        ["dead-letters", "ops"],
        transporter=node.url,
    )
    assert "unknown aggregate 'nope'" in unknown.one_error_line()
    for name in AGGREGATES:
        assert name in unknown.err  # the message lists the aggregates there are
    assert "'opsEventStore' is an event store, not an aggregate" in store.one_error_line()
    assert "'ops' is not an aggregate" in service.one_error_line()


def test_a_refused_connection_is_said_at_once_with_its_address() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    runs = cqrs(
        ["status"],
        ["status", "--json"],
        ["snapshot", "orderTotals"],
        ["snapshots", "orderTotals"],
        ["restore", "orderTotals", "snapshot_x"],
        ["replay", "orderTotals"],
        ["dead-letters", "orderTotals"],
        transporter=url,
    )
    for run in runs:
        line = run.one_error_line()
        assert f"connection refused by 127.0.0.1:{port} ({url})" in line, run
        assert "no node answered" not in line


def test_nothing_discovered_within_the_timeout() -> None:
    with NatsServer() as empty:
        (run,) = cqrs(["status", "--timeout", "0.5"], transporter=empty.url)
    assert "no node answered within 0.5s" in run.one_error_line()


def test_snapshot_snapshots_restore(node: Node) -> None:
    made, refused = cqrs(
        ["snapshot", "orderTotals"],
        ["snapshot", "shipments", "--json"],  # NoSnapshot: it fails, and says so
        transporter=node.url,
    )
    assert made.code == 0, made
    snapshot_id = made.out.strip()
    assert re.fullmatch(r"snapshot_[0-9a-f]{16}", snapshot_id), made
    assert "no backup strategy" in refused.one_error_line()

    table, listed, failed_listed = cqrs(
        ["snapshots", "orderTotals"],
        ["snapshots", "orderTotals", "--json"],
        ["snapshots", "shipments", "--json"],
        transporter=node.url,
    )
    (ours,) = [s for s in listed.json() if s["snapshotId"] == snapshot_id]
    assert ours["status"] == "completed"
    assert ours["size"] > 0
    assert ours["location"].endswith(f"{snapshot_id}/orderTotals")
    assert table.code == 0, table
    cells = row_of(table.out, snapshot_id)
    assert cells[1:3] == ["completed", str(ours["checkpoint"])]
    failed = [s for s in failed_listed.json() if s["status"] == "failed"]
    assert failed
    assert "no backup strategy" in failed[-1]["error"]

    async def place_another(broker: ServiceBroker) -> None:
        await broker.call("ops.place", {"sku": "after-snapshot", "qty": 9})

    with_broker(node.url, place_another)

    restored, bogus, refused_restore = cqrs(
        ["restore", "orderTotals", snapshot_id],
        ["restore", "orderTotals", "snapshot_0000000000000000"],
        ["restore", "shipments", failed[-1]["snapshotId"]],
        transporter=node.url,
    )
    assert restored.code == 0, restored
    assert restored.out == (
        f"restored orderTotals from {snapshot_id} (checkpoint {ours['checkpoint']}); "
        "it catches up from there\n"
    )
    assert "snapshot_0000000000000000" in bogus.one_error_line()
    refusal = refused_restore.one_error_line()
    assert "(409)" in refusal
    assert "cannot be restored" in refusal

    (again,) = cqrs(
        ["replay", "orderTotals", "--snapshot", snapshot_id, "--json"], transporter=node.url
    )
    answer = again.json()
    assert answer == {
        "state": "restored",
        "snapshotId": snapshot_id,
        "checkpoint": ours["checkpoint"],
    }

    async def rows(broker: ServiceBroker) -> list[str]:
        await caught_up(broker)
        found: list[dict[str, Any]] = await broker.call("orderTotals.find", {"sort": "sku"})
        return [row["sku"] for row in found]

    assert "after-snapshot" in with_broker(node.url, rows)  # caught up past the snapshot


def test_replay_shows_progress_and_ends_done(node: Node) -> None:
    shown, raw = cqrs(
        ["replay", "profileSummaryAggregate"], ["replay", "orderTotals", "--json"],
        transporter=node.url,
    )  # fmt: skip
    assert shown.code == 0, shown
    bar, done = shown.out.strip().splitlines()[-2:]
    total = re.search(r"(\d+)/(\d+)", bar)
    assert total is not None, shown
    assert total[1] == total[2]
    assert "done" in bar
    assert done.startswith(f"replay of profileSummaryAggregate done: {total[1]} events in ")
    progress = raw.json()
    assert progress["state"] == "done"
    assert progress["done"] == progress["total"] > 0
    assert progress["error"] is None

    async def totals(broker: ServiceBroker) -> int:
        await caught_up(broker)
        rows = await broker.call("profileSummaryAggregate.find", {})
        return sum(int(row["total"]) for row in rows)

    assert with_broker(node.url, totals) == PROFILES  # rebuilt, each event once


def test_a_page_past_the_last_says_so(node: Node) -> None:
    """(Before the dead letter is retried away below: the module shares one node.)"""
    (run,) = cqrs(["dead-letters", "shipments", "--page", "5"], transporter=node.url)
    assert run.code == 0, run
    assert "page 5 of 1" not in run.out
    assert run.out.strip() == "shipments: page 5 is past the last page (1); 1 in all"


def test_dead_letters_are_listed_and_retried(node: Node) -> None:
    table, listed = cqrs(
        ["dead-letters", "shipments"], ["dead-letters", "shipments", "--json"],
        transporter=node.url,
    )  # fmt: skip
    page = listed.json()
    assert (page["total"], page["page"], page["totalPages"]) == (1, 1, 1)
    (letter,) = page["rows"]
    assert letter["event"] == "order.shipped"
    assert letter["record"]["payload"]["sku"] == "poison"
    assert "cannot ship poison" in letter["error"]
    assert table.code == 0, table
    cells = row_of(table.out, "order.shipped")
    assert cells[:3] == [str(letter["id"]), str(letter["eventId"]), "order.shipped"]
    assert "ValueError: cannot ship poison" in table.out

    (still_broken,) = cqrs(["dead-letters", "shipments", "--retry", "--json"], transporter=node.url)
    answer = still_broken.json()
    assert (answer["retried"], answer["remaining"], len(answer["failed"])) == (0, 1, 1)

    (node.data / "fixed").touch()  # the transformation is fixed
    (retried,) = cqrs(["dead-letters", "shipments", "--retry"], transporter=node.url)
    assert retried.code == 0, retried
    assert retried.out.startswith("shipments: retried 1, failed again 0, remaining 0")

    async def shipped(broker: ServiceBroker) -> tuple[int, list[str]]:
        left: int = (await broker.call("shipments.deadLetters", {}))["total"]
        rows = await broker.call("shipments.find", {"sort": "qty"})
        return left, [row["sku"] for row in rows]

    left, skus = with_broker(node.url, shipped)
    assert left == 0
    assert skus[POISON] == "poison"


# --------------------------------------------------------------------------- 80 columns


def test_status_at_80_columns_shows_every_value(node: Node) -> None:
    async def statuses(broker: ServiceBroker) -> dict[str, dict[str, Any]]:
        await caught_up(broker)
        names = sorted(EVENT_STORES | AGGREGATES)
        return {name: await broker.call(f"{name}.status", {}) for name in names}

    expected = with_broker(node.url, statuses)
    (run,) = cqrs(["status"], transporter=node.url, columns=80)
    assert run.code == 0, run
    assert max(len(line) for line in run.out.splitlines()) <= 80, run.out
    blocks = re.split(r"\n(?=(?:event store|aggregate) )", run.out)
    for name in EVENT_STORES:
        (block,) = [b for b in blocks if b.startswith(f"event store {name}\n")]
        d = expected[name]["dispatcher"]
        assert f"head {expected[name]['head']}" in block, block
        assert f"cursor {d['cursor']} · lag {d['lag']}" in block, block
        assert f"lease {NODE_ID}" in block, block
    for name in AGGREGATES:
        (block,) = [b for b in blocks if b.startswith(f"aggregate {name} ")]
        status = expected[name]
        assert f"head {status['head']} · checkpoint {status['checkpoint']}" in block, block
        assert "lag 0 events, 0.0 s" in block, block
        assert f"dead letters {status['deadLetters']}" in block, block
        assert "state running" in block, block


def test_snapshots_at_80_columns_keep_ids_locations_and_errors_whole(node: Node) -> None:
    made, _ = cqrs(
        ["snapshot", "orderTotals"], ["snapshot", "shipments"], transporter=node.url
    )  # shipments has no backup strategy: its snapshot fails, with an error
    snapshot_id = made.out.strip()
    listed, table, failures = cqrs(
        ["snapshots", "orderTotals", "--json"],
        ["snapshots", "orderTotals"],
        ["snapshots", "shipments"],
        transporter=node.url,
        columns=80,
    )
    (ours,) = [s for s in listed.json() if s["snapshotId"] == snapshot_id]
    assert table.code == 0, table
    lines = table.out.splitlines()
    assert max(len(line) for line in lines) <= 80, table.out
    heading = lines.index(f"{snapshot_id} completed")  # the id, never cut
    block = lines[heading + 1 : heading + 6]
    at = next(i for i, line in enumerate(block) if line.lstrip().startswith("location "))
    location = block[at].strip().removeprefix("location ")
    for more in block[at + 1 :]:
        if not more.startswith("    "):
            break
        assert location.endswith("/"), "a location breaks only after a /"
        location += more.strip()
    assert location == ours["location"]
    assert "\n  error aggregate.snapshot action failed." in failures.out, failures.out
    assert "no backup strategy" in failures.out, failures.out
    assert max(len(line) for line in failures.out.splitlines()) <= 80


# --------------------------------------------------------------------------- status --watch


def test_watch_piped_prints_each_redraw_and_sigterm_leaves_the_cluster(node: Node) -> None:
    """Piped, every redraw is written as it is made; SIGTERM ends the watch as Ctrl-C does:
    the watcher says goodbye to the cluster (its DISCONNECT arrives at once) rather than
    leaving the nodes to log a missed heartbeat.

    MoleculerPy marks every disconnect ``unexpected``, so the test tells a DISCONNECT from a
    heartbeat timeout by time: the watcher sent a heartbeat at most 5 s before SIGTERM and
    the nodes give up on it 15 s after that, so a departure heard within 8 s was said."""

    async def watch(broker: ServiceBroker) -> tuple[str, bool]:
        gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_disconnect(payload: Any) -> None:
            if str(payload["node"].id).startswith("cqrs-cli-") and not gone.done():
                gone.set_result(True)

        broker.local_bus.on("$node.disconnected", on_disconnect)
        env = {**os.environ, "COLUMNS": "80"}
        env.pop("TRANSPORTER", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moleculerpy_cqrs.cli", "status", "--watch",
            "--interval", "0.2", "-t", node.url,
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        out = b""
        try:
            async with asyncio.timeout(30):
                while out.count(b"every 0.2s, last") < 2:
                    chunk = await process.stdout.read(4096)
                    assert chunk, (out, await process.stderr.read())  # type: ignore[union-attr]
                    out += chunk
            process.terminate()
            rest, _ = await asyncio.wait_for(process.communicate(), 20)
            assert process.returncode == 143
            said_goodbye = await asyncio.wait_for(gone, 8)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return (out + rest).decode(), said_goodbye

    text, said_goodbye = with_broker(node.url, watch)
    assert said_goodbye
    assert "aggregate orderTotals (fed by opsEventStore)" in text
    assert "Traceback" not in text
