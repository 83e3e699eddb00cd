"""The operator's commands: ``cqrs status``, ``snapshot``, ``snapshots``, ``restore``,
``replay`` and ``dead-letters``.

Each command starts a short-lived broker node that joins the cluster through the transporter,
waits (bounded) until the services it needs are visible in the registry, calls their actions
through the broker, prints the answers and stops the node. Event stores are the services that
expose ``read`` and ``status``; aggregates the ones that expose ``status`` and ``deadLetters``.

Every failure the operator can act on (no transporter, nothing discovered, an unknown
aggregate, an action's error) is an :class:`OperatorError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from moleculerpy import ServiceBroker, Settings
from moleculerpy.errors import MoleculerError, RequestTimeoutError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from moleculerpy_cqrs.broker import compat

QUIET: Final = 0.25
"""Discovery is over once a CQRS service is known and no node news came for this long: nodes
answer the new node's DISCOVER within milliseconds, and there is no count of nodes to await."""

POLL: Final = 0.2
"""How often ``replay`` asks the aggregate for its progress."""

LONG_CALL: Final = 600.0
"""Default bound on the answer of snapshot, restore, replay --snapshot and retry."""

Kind = Literal["event store", "aggregate"]


class OperatorError(Exception):
    """What went wrong, in one line for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class Options:
    """What every operator command takes."""

    transporter: str | None = None
    timeout: float = 10.0
    as_json: bool = False


@dataclass(frozen=True)
class Found:
    """One service as the registry knows it: its action names and the nodes running it."""

    name: str
    actions: frozenset[str]
    nodes: tuple[str, ...]

    @property
    def kind(self) -> Kind | None:
        if {"read", "status"} <= self.actions:
            return "event store"
        if {"status", "deadLetters"} <= self.actions:
            return "aggregate"
        return None


# --------------------------------------------------------------------------- the node


class _Silent:
    """MoleculerPy logs to stdout (and a remote error's stack trace at ERROR level): an
    operator command keeps stdout for its answer and stderr for its one error line."""

    def get_logger(self, module: str) -> _Silent:
        return self

    def bind(self, **_: Any) -> _Silent:
        return self

    def _drop(self, *args: Any, **kwargs: Any) -> None:
        pass

    trace = debug = info = warn = warning = error = fatal = critical = exception = _drop


class Session:
    """A started broker in the cluster, with the registry's view of its services."""

    def __init__(self, broker: ServiceBroker, options: Options) -> None:
        self.broker = broker
        self.options = options

    def services(self) -> dict[str, Found]:
        """Every service of the other nodes that are up, by name."""
        actions: dict[str, set[str]] = {}
        nodes: dict[str, list[str]] = {}
        for node in list(self.broker.node_catalog.nodes.values()):
            if node.local or not node.available:
                continue
            for service in node.services:
                if not isinstance(service, dict):
                    continue
                name = str(service.get("name") or "")
                if not name or name.startswith("$"):
                    continue
                prefix = f"{service.get('fullName') or name}."
                actions.setdefault(name, set()).update(
                    str((spec or {}).get("rawName") or key.removeprefix(prefix))
                    for key, spec in (service.get("actions") or {}).items()
                )
                nodes.setdefault(name, []).append(str(node.id))
        return {
            name: Found(name, frozenset(actions[name]), tuple(sorted(nodes[name])))
            for name in sorted(actions)
        }

    def cqrs_services(self) -> list[Found]:
        return [found for found in self.services().values() if found.kind is not None]

    async def discover(self, target: Callable[[], bool] = lambda: False) -> None:
        """Until ``target()`` holds, or some event store or aggregate is known and the
        registry has been quiet for a moment; :class:`OperatorError` if nothing turns up
        within the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.timeout
        changed = asyncio.Event()
        last_change = loop.time()

        def on_change(_payload: Any) -> None:
            changed.set()

        self.broker.local_bus.on("$node.*", on_change)
        try:
            while not target():
                now = loop.time()
                known = bool(self.cqrs_services())
                if known and now - last_change >= QUIET:
                    return
                if now >= deadline:
                    if known:
                        return
                    raise OperatorError(self._nothing_found())
                wake_at = min(deadline, last_change + QUIET) if known else deadline
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), max(wake_at - now, 0.001))
                except TimeoutError:
                    continue
                last_change = loop.time()
        finally:
            self.broker.local_bus.off("$node.*", on_change)

    def _nothing_found(self) -> str:
        transporter = self.broker.settings.transporter
        others = [n for n in self.broker.node_catalog.nodes.values() if not n.local]
        if not others:
            return (
                f"no node answered within {self.options.timeout:g}s on {transporter} "
                "(is a node running there? `cqrs run MODULE --transporter URL`)"
            )
        return (
            f"{len(others)} node(s) found on {transporter}, but no event store or aggregate "
            f"within {self.options.timeout:g}s"
        )

    async def aggregate(self, name: str) -> Found:
        """The aggregate ``name`` once it is visible; a clear error if it is not there."""

        def visible() -> bool:
            found = self.services().get(name)
            return found is not None and found.kind == "aggregate"

        await self.discover(visible)
        found = self.services().get(name)
        if found is not None and found.kind == "aggregate":
            return found
        if found is not None and found.kind == "event store":
            raise OperatorError(f"{name!r} is an event store, not an aggregate")
        if found is not None:
            raise OperatorError(
                f"{name!r} is not an aggregate (it has no status and deadLetters actions)"
            )
        aggregates = [f.name for f in self.cqrs_services() if f.kind == "aggregate"]
        known = ", ".join(aggregates) if aggregates else "none"
        raise OperatorError(f"unknown aggregate {name!r} (aggregates in the cluster: {known})")

    async def call(
        self, action: str, params: dict[str, Any], *, within: float | None = None
    ) -> Any:
        """Call ``action``; an error, or no answer ``within`` seconds, is an OperatorError."""
        within = self.options.timeout if within is None else within
        try:
            return await self.broker.call(action, params, timeout=within)
        except (RequestTimeoutError, TimeoutError):
            raise OperatorError(f"{action}: no answer within {within:g}s") from None
        except MoleculerError as error:
            code = f" ({error.code})" if getattr(error, "code", None) else ""
            raise OperatorError(f"{action} failed{code}: {error.message}") from None


def check_transporter(transporter: str | None) -> str:
    transporter = transporter or os.environ.get("TRANSPORTER") or ""
    if not transporter:
        raise OperatorError(
            "no transporter: pass --transporter URL (or set TRANSPORTER) to reach the cluster"
        )
    if transporter.startswith("memory://"):
        raise OperatorError(
            f"{transporter} cannot reach another process's services; "
            "pass the cluster's transporter, e.g. --transporter nats://127.0.0.1:4222"
        )
    return transporter


DEFAULT_PORTS: Final = {"nats": 4222, "redis": 6379, "rediss": 6379, "amqp": 5672,
                        "amqps": 5671, "mqtt": 1883, "kafka": 9092}  # fmt: skip
"""Transporters whose server is reached over TCP, and their default ports."""

PROBE_TIMEOUT: Final = 2.0


async def check_reachable(transporter: str, within: float) -> None:
    """Fail at once, naming the address, when the transporter's server refuses the connection
    or its host has no address: MoleculerPy's NATS client would retry until the timeout and
    the operator would only hear that no node answered. A server that is slow to accept is
    left to the broker's own (bounded) start."""
    targets: list[tuple[str, str, int]] = []
    for url in transporter.split(","):
        parts = urlsplit(url.strip())
        port = DEFAULT_PORTS.get(parts.scheme.lower())
        if port is None or not parts.hostname:
            return  # a transporter this check does not know: let the broker try
        try:
            targets.append((url.strip(), parts.hostname, parts.port or port))
        except ValueError:
            raise OperatorError(f"{url.strip()} is not a valid transporter URL") from None
    refused: list[str] = []
    for url, host, port in targets:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), min(within, PROBE_TIMEOUT)
            )
        except ConnectionRefusedError:
            refused.append(f"connection refused by {host}:{port} ({url})")
            continue
        except socket.gaierror:
            refused.append(f"no address for host {host!r} ({url})")
            continue
        except (TimeoutError, OSError):
            return  # not refused: perhaps slow; the broker's start is bounded anyway
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return
    if refused:
        raise OperatorError(
            "; ".join(refused) + ": check --transporter and that its server runs there"
        )


@asynccontextmanager
async def session(options: Options) -> AsyncIterator[Session]:
    """A broker joined to the cluster for one command; stopped on the way out."""
    transporter = check_transporter(options.transporter)
    await check_reachable(transporter, options.timeout)
    _quiet_stdlib_logging()
    node_id = f"cqrs-cli-{socket.gethostname()}-{os.getpid()}"
    settings = Settings(
        transporter=transporter,
        request_timeout=max(options.timeout, LONG_CALL),
        logger_factory=_Silent(),
    )
    broker = ServiceBroker(node_id, settings=settings)
    compat.install(broker)
    try:
        await asyncio.wait_for(broker.start(), options.timeout)
    except TimeoutError:
        await _stop_quietly(broker)
        raise OperatorError(
            f"could not join the cluster on {transporter} within {options.timeout:g}s"
        ) from None
    except Exception as error:
        await _stop_quietly(broker)
        cause = error.__cause__ or error
        raise OperatorError(f"could not join the cluster on {transporter}: {cause}") from None
    try:
        yield Session(broker, options)
    finally:
        await _stop_quietly(broker)


async def _stop_quietly(broker: ServiceBroker) -> None:
    try:
        await asyncio.wait_for(broker.stop(), 5)
    except Exception:
        pass  # the process ends right after; the cluster notices the node is gone


def _quiet_stdlib_logging() -> None:
    """Without a handler, Python prints warnings of the NATS client and the toolkit (with
    tracebacks) to stderr; the one error line is what the operator gets."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())


# --------------------------------------------------------------------------- output


def _stdout() -> Console:
    # A table piped into grep keeps whole names rather than 80 columns of ellipses.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(width=wide, highlight=False)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _size(size: Any) -> str:
    if not isinstance(size, int | float):
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)  # pragma: no cover


# --------------------------------------------------------------------------- status


async def status(options: Options, *, watch: bool = False, interval: float = 2.0) -> None:
    if watch and options.as_json:
        raise OperatorError("--watch draws a live table; leave out --json")
    async with session(options) as s:
        await s.discover()
        if watch:
            await _watch_status(s, interval)
            return
        rows = await _status_rows(s)
    if options.as_json:
        print_json(
            {
                "eventStores": [_status_row(f, a) for f, a in rows if f.kind == "event store"],
                "aggregates": [_status_row(f, a) for f, a in rows if f.kind == "aggregate"],
            }
        )
    else:
        table, notes = status_table(rows)
        console = _stdout()
        console.print(table)
        for note in notes:
            console.print(escape(note), soft_wrap=True)
    failures = [a for _, a in rows if isinstance(a, BaseException)]
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise OperatorError(f"{failures[0]}{more}")


async def _status_rows(s: Session) -> list[tuple[Found, Any]]:
    found = s.cqrs_services()
    answers = await asyncio.gather(
        *(s.call(f"{f.name}.status", {}) for f in found), return_exceptions=True
    )
    return sorted(zip(found, answers, strict=True), key=_status_order)


async def _watch_status(s: Session, interval: float) -> None:
    """Redraw the status table every ``interval`` seconds until interrupted; services
    that appear or go away meanwhile come and go in the table."""
    console = _stdout()

    def render(rows: list[tuple[Found, Any]]) -> Group:
        table, notes = status_table(rows)
        stamp = datetime.now().strftime("%H:%M:%S")
        table.caption = f"every {interval:g}s, last {stamp}; Ctrl-C ends"
        return Group(table, *(Text(note) for note in notes))

    with Live(render(await _status_rows(s)), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            live.update(render(await _status_rows(s)), refresh=True)


def _status_order(row: tuple[Found, Any]) -> tuple[str, int, str]:
    """Each event store followed by the aggregates it feeds; what did not answer last."""
    found, answer = row
    if isinstance(answer, BaseException) or not isinstance(answer, dict):
        return ("\uffff", 2, found.name)
    if found.kind == "event store":
        return (found.name, 0, found.name)
    return (str(answer.get("eventStore") or "\uffff"), 1, found.name)


def _status_row(found: Found, answer: Any) -> dict[str, Any]:
    if isinstance(answer, BaseException):
        return {"name": found.name, "error": str(answer)}
    row: dict[str, Any] = answer
    return row


def _lease_cells(found: Found, lease: Any) -> tuple[str, str]:
    """The node that holds (or last held) the lease, and the other nodes running the
    service: they stand by and take over once the lease lapses."""
    holder = str(lease["node"]) if isinstance(lease, dict) and lease.get("node") else None
    standby = [node for node in found.nodes if node != holder]
    return holder or "-", ", ".join(standby) or "-"


def status_table(rows: list[tuple[Found, Any]]) -> tuple[Table, list[str]]:
    """The status table, and the notes (last errors) to print under it."""
    table = Table(title="cqrs status")
    numbers = ("head", "checkpoint/cursor", "lag (events)", "lag (s)", "dead letters")
    for column in ("kind", "name", *numbers[:4], "state", numbers[4], "lease", "standby"):
        right = column in numbers
        table.add_column(column, justify="right" if right else "left", no_wrap=not right)
    notes: list[str] = []
    for f, answer in rows:
        if isinstance(answer, BaseException):
            nodes = ", ".join(f.nodes)
            table.add_row(
                f.kind, f.name, "-", "-", "-", "-", "[red]unreachable[/]", "-", "-", nodes
            )  # fmt: skip
            continue
        if f.kind == "event store":
            d = answer.get("dispatcher") or {}
            lease, standby = _lease_cells(f, d.get("lease"))
            state = "standby" if d.get("standby") else "running" if d.get("running") else "stopped"
            if d.get("failed"):
                state += f" ({d['failed']} failed)"
            table.add_row(
                "event store", f.name, _cell(answer.get("head")), _cell(d.get("cursor")),
                _cell(d.get("lag")), "-", state, "-", lease, standby,
            )  # fmt: skip
            if d.get("lastError"):
                notes.append(f"{f.name}: dispatcher's last error: {d['lastError']}")
        else:
            lag = answer.get("lag") or {}
            state = str(answer.get("state"))
            if answer.get("haltedAt") is not None:
                state += f" at {answer['haltedAt']}"
            replay = answer.get("replay") or {}
            if answer.get("rebuild"):  # "rebuilding v2: 43%, about 12 s left", "outdated: ..."
                state = str(answer["rebuild"])
            elif replay.get("state") in ("running", "swapping"):
                state += f", replaying {replay.get('done', 0)}/{replay.get('total', 0)}"
            seconds = lag.get("seconds")
            lease, standby = _lease_cells(f, answer.get("lease"))
            table.add_row(
                "aggregate", f.name, _cell(answer.get("head")), _cell(answer.get("checkpoint")),
                _cell(lag.get("events")),
                f"{seconds:.1f}" if isinstance(seconds, int | float) else "-",
                state, _cell(answer.get("deadLetters")), lease, standby,
            )  # fmt: skip
            if answer.get("lastError"):
                notes.append(f"{f.name}: last error: {answer['lastError']}")
    return table, notes


# --------------------------------------------------------------------------- snapshots


async def snapshot(options: Options, aggregate: str, *, call_timeout: float) -> None:
    async with session(options) as s:
        await s.aggregate(aggregate)
        snapshot_id = await s.call(f"{aggregate}.snapshot", {}, within=call_timeout)
    if options.as_json:
        print_json(snapshot_id)
    else:
        sys.stdout.write(f"{snapshot_id}\n")


async def snapshots(options: Options, aggregate: str) -> None:
    async with session(options) as s:
        await s.aggregate(aggregate)
        rows: list[dict[str, Any]] = await s.call(f"{aggregate}.snapshots", {})
    if options.as_json:
        print_json(rows)
        return
    console = _stdout()
    if not rows:
        console.print(f"no snapshots of {escape(aggregate)}")
        return
    table = Table(title=f"snapshots of {aggregate}")
    for column in ("snapshot", "status", "checkpoint", "size", "created", "updated"):
        right = column in ("checkpoint", "size")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    table.add_column("location", overflow="fold")
    table.add_column("error", overflow="fold")
    colours = {"completed": "green", "failed": "red", "created": "yellow"}
    for row in rows:
        state = str(row.get("status"))
        table.add_row(
            _cell(row.get("snapshotId")),
            f"[{colours.get(state, 'white')}]{escape(state)}[/]",
            _cell(row.get("checkpoint")),
            _size(row.get("size")),
            _when(row.get("created")),
            _when(row.get("updated")),
            escape(_cell(row.get("location"))),
            escape(_cell(row.get("error"))),
        )
    console.print(table)


async def restore(
    options: Options, aggregate: str, snapshot_id: str, *, call_timeout: float
) -> None:
    async with session(options) as s:
        await s.aggregate(aggregate)
        answer = await s.call(
            f"{aggregate}.restore", {"snapshotID": snapshot_id}, within=call_timeout
        )
    if options.as_json:
        print_json(answer)
    else:
        sys.stdout.write(
            f"restored {aggregate} from {answer.get('snapshotId', snapshot_id)} "
            f"(checkpoint {answer.get('checkpoint')}); it catches up from there\n"
        )


# --------------------------------------------------------------------------- replay


async def replay(
    options: Options, aggregate: str, *, snapshot_id: str | None, call_timeout: float
) -> None:
    async with session(options) as s:
        await s.aggregate(aggregate)
        if snapshot_id is not None:
            answer = await s.call(
                f"{aggregate}.replay", {"snapshotID": snapshot_id, "wait": True},
                within=call_timeout,
            )  # fmt: skip
            if options.as_json:
                print_json(answer)
            else:
                sys.stdout.write(
                    f"restored {aggregate} from {snapshot_id} (checkpoint "
                    f"{answer.get('checkpoint')}) and caught up with the log\n"
                )
            return
        started = await s.call(f"{aggregate}.replay", {})
        final = await _follow_replay(s, aggregate, started)
    if final.get("state") == "failed":
        raise OperatorError(f"replay of {aggregate} failed: {final.get('error')}")
    if options.as_json:
        print_json(final)
        return
    elapsed = (final.get("finished") or time.time()) - (final.get("started") or time.time())
    sys.stdout.write(
        f"replay of {aggregate} done: {final.get('done')} events in {elapsed:.1f}s "
        f"({final.get('events_per_second', 0):.0f} events/s)\n"
    )


async def _follow_replay(s: Session, aggregate: str, started: dict[str, Any]) -> dict[str, Any]:
    """Poll ``<aggregate>.status`` until the replay that answered ``started`` ends, with a
    live progress bar unless the output is JSON."""

    def ours(progress: Any) -> bool:
        return isinstance(progress, dict) and progress.get("started") == started.get("started")

    async def progress_now() -> dict[str, Any]:
        answer = await s.call(f"{aggregate}.status", {})
        progress = answer.get("replay") if isinstance(answer, dict) else None
        if not ours(progress):
            raise OperatorError(f"{aggregate} no longer reports the replay it started")
        assert isinstance(progress, dict)
        return progress

    current = started
    if s.options.as_json:
        while current.get("state") not in ("done", "failed"):
            await asyncio.sleep(POLL)
            current = await progress_now()
        return current
    columns = (
        TextColumn("[bold]replay[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} ev/s"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_stdout()) as bar:
        task = bar.add_task(escape(aggregate), total=None, rate=0.0, state="")

        def show(p: dict[str, Any]) -> None:
            total = p.get("total") or None
            bar.update(
                task, total=total, completed=p.get("done", 0),
                rate=float(p.get("events_per_second") or 0.0), state=p.get("state", ""),
            )  # fmt: skip

        show(current)
        while current.get("state") not in ("done", "failed"):
            await asyncio.sleep(POLL)
            current = await progress_now()
            show(current)
    return current


# --------------------------------------------------------------------------- dead letters


async def dead_letters(
    options: Options, aggregate: str, *, page: int, page_size: int, retry: bool,
    call_timeout: float,
) -> None:  # fmt: skip
    async with session(options) as s:
        await s.aggregate(aggregate)
        if retry:
            answer = await s.call(f"{aggregate}.retryDeadLetters", {}, within=call_timeout)
        else:
            answer = await s.call(f"{aggregate}.deadLetters", {"page": page, "pageSize": page_size})
    if options.as_json:
        print_json(answer)
    elif retry:
        _print_retry(aggregate, answer)
    else:
        _print_dead_letters(aggregate, answer)


def _print_retry(aggregate: str, answer: dict[str, Any]) -> None:
    failed = answer.get("failed") or []
    count = len(failed) if isinstance(failed, list) else failed
    console = _stdout()
    console.print(
        f"{escape(aggregate)}: retried {answer.get('retried')}, failed again {count}, "
        f"remaining {answer.get('remaining')}",
        soft_wrap=True,
    )
    for item in failed if isinstance(failed, list) else []:
        if isinstance(item, dict):
            console.print(
                f"  dead letter {item.get('id')}: {escape(str(item.get('error')))}", soft_wrap=True
            )


def _print_dead_letters(aggregate: str, answer: dict[str, Any]) -> None:
    console = _stdout()
    rows: list[dict[str, Any]] = answer.get("rows") or []
    total = answer.get("total", len(rows))
    if not total:
        console.print(f"no dead letters in {escape(aggregate)}")
        return
    table = Table(
        title=f"dead letters of {aggregate}",
        caption=f"page {answer.get('page')} of {answer.get('totalPages')}, {total} in all",
    )
    for column in ("id", "event id", "event", "handler", "kind", "attempts", "error", "updated"):
        right = column in ("id", "event id", "attempts")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in rows:
        table.add_row(
            _cell(row.get("id")),
            _cell(row.get("eventId")),
            escape(_cell(row.get("event"))),
            escape(_cell(row.get("handler"))),
            _cell(row.get("kind")),
            _cell(row.get("attempts")),
            escape(_cell(row.get("error"))),
            _when(row.get("updated")),
        )
    console.print(table)
