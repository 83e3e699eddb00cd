"""The operator's client: a broker node of its own that joins the cluster, finds the event
stores and aggregates there, and calls their actions, answering typed values (``face.model``).

The command line (``cqrs status`` and the other operator commands), and the web page
(``cqrs ui`` and ``cqrs run --ui-port``) use it. It discovers services through the broker's
registry (bounded waits), probes the transporter's address first so that a refused connection
is said at once, and keeps MoleculerPy's logging off stdout.

Every failure the operator can act on (no transporter, nothing discovered, an unknown
aggregate, an action's error) is an :class:`OperatorError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Final

from moleculerpy import ServiceBroker, Settings
from moleculerpy.errors import MoleculerError, RequestTimeoutError

from moleculerpy_cqrs.broker import compat
from moleculerpy_cqrs.core.records import Status
from moleculerpy_cqrs.face import reach
from moleculerpy_cqrs.face.model import (
    AggregateStatus,
    ClusterStatus,
    DeadLetter,
    EventStoreStatus,
    Kind,
    Page,
    ReplayProgress,
    RetryResult,
    Snapshot,
    Unreachable,
    dead_letter_page,
    event_page,
    status_from_answer,
)

QUIET: Final = 0.25
"""Discovery is over once a CQRS service is known and no node news came for this long: nodes
answer the new node's DISCOVER within milliseconds, and there is no count of nodes to await."""

POLL: Final = 0.2
"""How often ``replay`` asks the aggregate for its progress."""

LONG_CALL: Final = 600.0
"""Default bound on the answer of snapshot, restore, replay --snapshot and retry."""


class OperatorError(Exception):
    """What went wrong, in one line for the operator."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code
        """The action's error code (a Moleculer error's, e.g. 404, 409, 422), if any."""


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

    def __init__(
        self, broker: ServiceBroker, options: Options, *, include_local: bool = False
    ) -> None:
        self.broker = broker
        self.options = options
        self.include_local = include_local
        """Count this node's own services too (the page served by ``cqrs run --ui-port``)."""

    def services(self) -> dict[str, Found]:
        """Every service of the other nodes that are up, by name."""
        actions: dict[str, set[str]] = {}
        nodes: dict[str, list[str]] = {}
        for node in list(self.broker.node_catalog.nodes.values()):
            if (node.local and not self.include_local) or not (node.local or node.available):
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
            raise OperatorError(f"{name!r} is an event store, not an aggregate", 404)
        if found is not None:
            raise OperatorError(
                f"{name!r} is not an aggregate (it has no status and deadLetters actions)", 404
            )
        aggregates = [f.name for f in self.cqrs_services() if f.kind == "aggregate"]
        known = ", ".join(aggregates) if aggregates else "none"
        raise OperatorError(f"unknown aggregate {name!r} (aggregates in the cluster: {known})", 404)

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
            code = getattr(error, "code", None)
            said = f" ({code})" if code else ""
            raise OperatorError(
                f"{action} failed{said}: {error.message}", code if isinstance(code, int) else None
            ) from None


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


@asynccontextmanager
async def session(options: Options) -> AsyncIterator[Session]:
    """A broker joined to the cluster for one command; stopped on the way out."""
    transporter = check_transporter(options.transporter)
    # A missing package, refused credentials, a refused connection: one line, at once.
    await reach.check(transporter, options.timeout)
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


@contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """SIGTERM cancels the running task as Ctrl-C does, so that the ``finally`` blocks run:
    the node leaves the cluster with a DISCONNECT (the others would otherwise log missed
    heartbeats for it) and a live table gives the cursor back. The process then exits 143."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[bool] = []

    def on_term() -> None:
        got.append(True)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_term)
    except (NotImplementedError, RuntimeError):  # not the main thread
        yield
        return
    try:
        yield
    except asyncio.CancelledError:
        if got:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# --------------------------------------------------------------------------- the typed client


class OperatorClient:
    """The cluster's event stores and aggregates, and what an operator does to them, as
    typed values. One client per joined :class:`Session`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def options(self) -> Options:
        return self.session.options

    async def status(self) -> ClusterStatus:
        """Every event store and aggregate's status, asked side by side."""
        found = self.session.cqrs_services()
        answers = await asyncio.gather(
            *(self.session.call(f"{f.name}.status", {}) for f in found), return_exceptions=True
        )
        stores: list[EventStoreStatus] = []
        aggregates: list[AggregateStatus] = []
        unreachable: list[Unreachable] = []
        for f, answer in zip(found, answers, strict=True):
            kind: Kind = f.kind or "aggregate"
            if isinstance(answer, BaseException):
                unreachable.append(Unreachable(f.name, kind, f.nodes, str(answer)))
                continue
            try:
                status = status_from_answer(answer, f.nodes)
            except ValueError as error:
                unreachable.append(Unreachable(f.name, kind, f.nodes, str(error)))
                continue
            if isinstance(status, EventStoreStatus):
                stores.append(status)
            elif isinstance(status, AggregateStatus):
                aggregates.append(status)
            else:
                unreachable.append(
                    Unreachable(f.name, kind, f.nodes, f"{f.name}.status: not a CQRS status")
                )
        return ClusterStatus(tuple(stores), tuple(aggregates), tuple(unreachable))

    async def aggregate_status(self, aggregate: str) -> AggregateStatus:
        await self.session.aggregate(aggregate)
        answer = await self.session.call(f"{aggregate}.status", {})
        status = status_from_answer(answer, self.session.services()[aggregate].nodes)
        if not isinstance(status, AggregateStatus):
            raise OperatorError(f"{aggregate}.status did not answer an aggregate's status")
        return status

    async def snapshot(self, aggregate: str, *, within: float | None = None) -> str:
        await self.session.aggregate(aggregate)
        return str(await self.session.call(f"{aggregate}.snapshot", {}, within=within))

    async def snapshots(self, aggregate: str) -> list[Snapshot]:
        await self.session.aggregate(aggregate)
        rows = await self.session.call(f"{aggregate}.snapshots", {})
        return [Snapshot.from_answer(row) for row in rows or []]

    async def restore(
        self, aggregate: str, snapshot_id: str, *, within: float | None = None
    ) -> dict[str, Any]:
        await self.session.aggregate(aggregate)
        answer: dict[str, Any] = await self.session.call(
            f"{aggregate}.restore", {"snapshotID": snapshot_id}, within=within
        )
        return answer

    async def replay_from_snapshot(
        self, aggregate: str, snapshot_id: str, *, within: float | None = None
    ) -> dict[str, Any]:
        """Restore ``snapshot_id`` and wait until the aggregate caught up with the log."""
        await self.session.aggregate(aggregate)
        answer: dict[str, Any] = await self.session.call(
            f"{aggregate}.replay", {"snapshotID": snapshot_id, "wait": True}, within=within
        )
        return answer

    async def start_replay(self, aggregate: str) -> ReplayProgress:
        """Start rebuilding ``aggregate`` from the whole log; answers its first progress."""
        await self.session.aggregate(aggregate)
        progress = ReplayProgress.from_answer(await self.session.call(f"{aggregate}.replay", {}))
        if progress is None:
            raise OperatorError(f"{aggregate}.replay answered no progress")
        return progress

    async def replay_progress(self, aggregate: str) -> ReplayProgress | None:
        return (await self.aggregate_status(aggregate)).replay

    async def dead_letters(
        self, aggregate: str, *, page: int = 1, page_size: int = 20
    ) -> Page[DeadLetter]:
        await self.session.aggregate(aggregate)
        answer = await self.session.call(
            f"{aggregate}.deadLetters", {"page": page, "pageSize": page_size, "sort": "id"}
        )
        return dead_letter_page(answer)

    async def retry(
        self, aggregate: str, ids: list[int] | None = None, *, within: float | None = None
    ) -> RetryResult:
        """Apply the dead letters ``ids`` (None: all of them) again."""
        await self.session.aggregate(aggregate)
        params: dict[str, Any] = {} if ids is None else {"ids": ids}
        answer = await self.session.call(f"{aggregate}.retryDeadLetters", params, within=within)
        return RetryResult.from_answer(answer)

    async def event_store(self, name: str) -> None:
        """Wait (bounded) until the event store ``name`` is visible; an error if it is not."""
        await self.session.discover(lambda: _kind(self.session, name) == "event store")
        if _kind(self.session, name) != "event store":
            stores = [f.name for f in self.session.cqrs_services() if f.kind == "event store"]
            raise OperatorError(
                f"unknown event store {name!r} (event stores in the cluster: "
                f"{', '.join(stores) or 'none'})",
                404,
            )

    async def events(
        self,
        store: str,
        *,
        page: int = 1,
        page_size: int = 50,
        event: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        failed_only: bool = False,
    ) -> Page[dict[str, Any]]:
        """A page of the log, newest first, filtered by event name and creation time (Unix
        ms, ``until`` excluded); ``failed_only``: the events the dispatcher gave up on."""
        await self.event_store(store)
        query: dict[str, Any] = {}
        if event:
            query["event"] = event
        created: dict[str, int] = {}
        if since_ms is not None:
            created[">="] = since_ms
        if until_ms is not None:
            created["<"] = until_ms
        if created:
            query["created"] = created
        if failed_only:
            query["status"] = int(Status.FAILED)
        params: dict[str, Any] = {"page": page, "pageSize": page_size, "sort": "-id"}
        if query:
            params["query"] = query
        return event_page(await self.session.call(f"{store}.list", params))

    async def event(self, store: str, event_id: int) -> dict[str, Any]:
        await self.event_store(store)
        answer: dict[str, Any] = await self.session.call(f"{store}.get", {"id": event_id})
        return answer


def _kind(session: Session, name: str) -> Kind | None:
    found = session.services().get(name)
    return found.kind if found else None


@asynccontextmanager
async def operator_client(options: Options) -> AsyncIterator[OperatorClient]:
    """A client joined to the cluster, its registry filled (bounded); left on the way out."""
    async with session(options) as joined:
        await joined.discover()
        yield OperatorClient(joined)
