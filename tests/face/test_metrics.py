"""The Prometheus endpoint of a node, scraped over real HTTP, and who holds each lease.

Nodes serve the profile example on SQLite files; the endpoint is ``face.metrics`` (what
``cqrs run --metrics-port`` starts), read with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker
from moleculerpy.errors import MoleculerError
from prometheus_client.parser import text_string_to_metric_families

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.face.metrics import serve_metrics
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.profile_example import PROFILE_MODULE, build

ROOT = Path(__file__).resolve().parents[2]
KEY = "idempotencyKey"
STORE, AGGREGATE = "profileEventStore", "profileSummaryAggregate"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=20) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (exactly one must)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def test_a_node_exposes_its_figures(tmp_path: Path) -> None:
    events, summary, service = build(stores.sqlite(tmp_path), lease_ttl=30)
    async with running_broker(service(), node_id="metrics-n1") as broker:
        metrics = serve_metrics(broker, port=0)
        try:
            for i in range(5):
                await broker.call("profile.update", {"name": f"p{i}", "country": "NZ"})
            with pytest.raises(MoleculerError) as refused:
                await broker.call("profile.update", {"name": "nul \u0000"})
            assert refused.value.code == 422
            await broker.call("profile.update", {"name": "no country"})  # a dead letter
            await asyncio.wait_for(summary.runtime(broker).wait_caught_up(6), 30)
            await asyncio.wait_for(events.runtime(broker).dispatcher.wait_settled(6), 30)
            await broker.call("profile.$stopDispatch", {})
            for i in range(2):  # stored, projected, not dispatched
                await broker.call(
                    "profile.update", {"name": f"q{i}", "country": "AU"}, meta={KEY: f"q{i}"}
                )
            # A repeat of a key: answered the stored event; other params: 409.
            await broker.call("profile.update", {"name": "q0", "country": "AU"}, meta={KEY: "q0"})
            with pytest.raises(MoleculerError) as conflict:
                await broker.call(
                    "profile.update", {"name": "x", "country": "AU"}, meta={KEY: "q0"}
                )
            assert conflict.value.code == 409
            await asyncio.wait_for(summary.runtime(broker).wait_caught_up(8), 30)

            samples = await asyncio.to_thread(scrape, metrics.url)
            store_status = await broker.call(f"{STORE}.status", {})
            aggregate_status = await broker.call(f"{AGGREGATE}.status", {})
        finally:
            metrics.close()

    update = {"event_store": STORE, "action": "profile.update"}
    assert value(samples, "cqrs_append_seconds_count", **update) == 8
    assert value(samples, "cqrs_append_calls_total", **update, result="stored") == 8
    assert value(samples, "cqrs_append_calls_total", **update, result="refused") == 1
    assert value(samples, "cqrs_append_calls_total", **update, result="duplicate") == 1
    assert value(samples, "cqrs_append_calls_total", **update, result="conflict") == 1
    assert value(samples, "cqrs_append_seconds_bucket", **update, le="+Inf") == 8
    assert value(samples, "cqrs_append_seconds_sum", **update) > 0

    es = {"event_store": STORE}
    assert value(samples, "cqrs_event_store_head", **es) == store_status["head"] == 8
    assert value(samples, "cqrs_events_appended_total", **es) == 8
    assert value(samples, "cqrs_event_store_duplicates_total", **es) == 1
    assert value(samples, "cqrs_dispatcher_cursor", **es) == 6
    assert value(samples, "cqrs_dispatcher_lag_events", **es) == 2
    assert value(samples, "cqrs_dispatcher_state", **es, state="stopped") == 1
    assert value(samples, "cqrs_dispatcher_state", **es, state="running") == 0

    agg = {"aggregate": AGGREGATE, "event_store": STORE}
    assert value(samples, "cqrs_aggregate_checkpoint", **agg) == aggregate_status["checkpoint"]
    assert value(samples, "cqrs_aggregate_head", **agg) == 8
    assert value(samples, "cqrs_aggregate_lag_events", **agg) == 0
    assert value(samples, "cqrs_aggregate_lag_seconds", **agg) == 0
    assert value(samples, "cqrs_aggregate_dead_letters", **agg) == 1
    assert value(samples, "cqrs_aggregate_rows", **agg) == 2  # NZ and AU
    assert value(samples, "cqrs_aggregate_state", **agg, state="running") == 1
    assert value(samples, "cqrs_aggregate_lease_held", **agg) == 1
    assert value(samples, "cqrs_aggregate_lease_holder", **agg, node="metrics-n1") == 1
    # A stopped dispatcher gave its lease up, so that another node can take over at once.
    assert value(samples, "cqrs_dispatcher_lease_held", **es) == 0
    assert not [name for name, _ in samples if name == "cqrs_dispatcher_lease_holder"]
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)


def test_cqrs_run_serves_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "CQRS_DATA": str(tmp_path)}
    env.pop("TRANSPORTER", None)
    command = [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", PROFILE_MODULE,
               "--metrics-port", "0", "--node-id", "run-n1"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:  # ends if the node exits
            seen.append(line)
            if found := re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line):
                break
        else:
            raise AssertionError(f"no metrics line: {''.join(seen)}")
        # The dispatcher takes its lease in its own time after `ready` (nothing announces
        # it): scrape until the holder shows, within a bound.
        deadline = time.monotonic() + 20
        while True:
            samples = scrape(found[1])
            holders = [n for n, _ in samples if n == "cqrs_dispatcher_lease_holder"]
            if holders or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
    assert value(samples, "cqrs_event_store_head", event_store=STORE) == 0
    assert value(samples, "cqrs_aggregate_head", aggregate=AGGREGATE) == 0
    assert value(samples, "cqrs_dispatcher_lease_holder", event_store=STORE, node="run-n1") == 1


# --------------------------------------------------------------------------- two nodes


Runtimes = tuple[ServiceBroker, Any, Any]


@asynccontextmanager
async def node(data: Path, url: str, node_id: str) -> AsyncIterator[Runtimes]:
    """A node of the profile example on the shared SQLite files under ``data``: its broker,
    its event store's runtime and its aggregate's."""
    events, summary, service = build(stores.sqlite(data), lease_ttl=30)  # no lease lapses here
    instance: Service = service()
    async with running_broker(instance, transporter=url, node_id=node_id) as broker:
        yield broker, events.runtime(broker), summary.runtime(broker)


async def until(node: Runtimes, check: Callable[[dict[str, Any]], bool]) -> None:
    """Until both statuses of ``node`` pass ``check`` (the workers take or wait for the
    lease in their own time: nothing announces it)."""
    _, store, aggregate = node
    async with asyncio.timeout(20):
        while True:
            if check(await store.status()) and check(await aggregate.status()):
                return
            await asyncio.sleep(0.05)


def _lease(status: dict[str, Any]) -> dict[str, Any]:
    lease = status["dispatcher"]["lease"] if "dispatcher" in status else status["lease"]
    return lease or {}


async def test_status_says_which_node_holds_each_lease(tmp_path: Path, nats_url: str) -> None:
    async with node(tmp_path, nats_url, "lease-n1") as first:
        await until(first, lambda status: bool(_lease(status).get("mine")))
        async with node(tmp_path, nats_url, "lease-n2") as second:
            n1, n2 = first[0], second[0]
            await until(second, lambda status: _lease(status).get("node") == "lease-n1")
            await until(
                second,
                lambda s: bool(
                    s["dispatcher"]["standby"] if "dispatcher" in s else s["state"] == "standby"
                ),
            )
            await n1.wait_for_services([STORE, AGGREGATE], timeout=10)
            metrics = serve_metrics(n2, port=0)
            try:
                samples = await asyncio.to_thread(scrape, metrics.url)
            finally:
                metrics.close()
            env = {**os.environ, "COLUMNS": "200"}
            cli = [sys.executable, "-m", "moleculerpy_cqrs.cli", "status", "-t", nats_url]
            table = await asyncio.create_subprocess_exec(
                *cli, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(table.communicate(), 60)
            assert table.returncode == 0, err.decode()

    rows = {line.split("│")[2].strip(): line for line in out.decode().splitlines() if "│" in line}
    for name in (STORE, AGGREGATE):
        *_, lease, standby = (cell.strip() for cell in rows[name].split("│")[1:-1])
        assert (lease, standby) == ("lease-n1", "lease-n2")

    # n2 stands by: it says so, and names the holder.
    es, agg = {"event_store": STORE}, {"aggregate": AGGREGATE}
    assert value(samples, "cqrs_dispatcher_state", **es, state="standby") == 1
    assert value(samples, "cqrs_dispatcher_lease_held", **es) == 0
    assert value(samples, "cqrs_dispatcher_lease_holder", **es, node="lease-n1") == 1
    assert value(samples, "cqrs_aggregate_state", **agg, state="standby") == 1
    assert value(samples, "cqrs_aggregate_lease_held", **agg) == 0
    assert value(samples, "cqrs_aggregate_lease_holder", **agg, node="lease-n1") == 1


# --------------------------------------------------------------------------- status --watch

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A pseudo-terminal's output, collected as the program writes it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self.raw = ""  # with the escape sequences
        self.changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # the program closed the terminal
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.fd)
        self.raw += chunk.decode(errors="replace")
        self.text += ANSI.sub("", chunk.decode(errors="replace"))
        self.changed.set()

    async def wait_for(self, pattern: str, *, after: int = 0, within: float = 30.0) -> int:
        """Until ``pattern`` shows after offset ``after``; answers where its match ends."""
        async with asyncio.timeout(within):
            while not (found := re.compile(pattern).search(self.text, after)):
                self.changed.clear()
                await self.changed.wait()
        return found.end()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


async def test_status_watch_redraws_the_table(tmp_path: Path, nats_url: str) -> None:
    async with node(tmp_path, nats_url, "watch-n1") as (broker, _, aggregate):
        for i in range(3):
            await broker.call("profile.update", {"name": f"p{i}", "country": "NZ"})
        primary, secondary = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm"}
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moleculerpy_cqrs.cli", "status", "--watch",
            "--interval", "0.2", "-t", nats_url,
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        terminal = Terminal(primary)
        try:
            seen = await terminal.wait_for(rf"{STORE}\s*│\s*3\s*│")
            for i in range(2):  # the next redraws show them
                await broker.call("profile.update", {"name": f"q{i}", "country": "AU"})
            await aggregate.wait_caught_up(5)
            await terminal.wait_for(rf"{AGGREGATE}\s*│\s*5\s*│\s*5\s*│", after=seen)
            watch.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(watch.wait(), 20) == 130
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
            terminal.close()
    assert "Traceback" not in terminal.text
    assert "watch-n1" in terminal.text  # the lease column


HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


async def test_status_watch_gives_the_cursor_back_on_sigterm(tmp_path: Path, nats_url: str) -> None:
    async with node(tmp_path, nats_url, "term-n1"):
        primary, secondary = pty.openpty()
        env = {**os.environ, "COLUMNS": "80", "LINES": "50", "TERM": "xterm"}
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moleculerpy_cqrs.cli", "status", "--watch",
            "--interval", "0.2", "-t", nats_url,
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        terminal = Terminal(primary)
        try:
            await terminal.wait_for(AGGREGATE)
            assert HIDE_CURSOR in terminal.raw
            watch.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(watch.wait(), 20) == 143
            async with asyncio.timeout(10):  # until the last of its output is read
                while terminal.raw.rfind(SHOW_CURSOR) < terminal.raw.rfind(HIDE_CURSOR):
                    terminal.changed.clear()
                    await terminal.changed.wait()
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
            terminal.close()
    assert "Traceback" not in terminal.text


def test_watch_and_json_do_not_mix() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "moleculerpy_cqrs.cli", "status", "--watch", "--json",
         "-t", "nats://127.0.0.1:4222"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == "error: --watch draws a live table; leave out --json"


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", PROFILE_MODULE,
             "--metrics-port", str(port)],
            cwd=ROOT, env={**os.environ, "CQRS_DATA": str(tmp_path)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"error: cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
