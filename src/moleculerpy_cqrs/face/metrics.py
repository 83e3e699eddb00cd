"""A Prometheus endpoint for one node (``cqrs run --metrics-port N``).

The figures are read at scrape time from the ``status()`` of the event stores and aggregates
running on this node, typed by ``face.model`` as ``cqrs status`` and the web page read them
(one series per state of ``core.states``), plus the broker's append
timings (``broker.timings``). MoleculerPy 0.14.22 has a Prometheus reporter, but it only
renders its own metric registry as text (serving HTTP is left to the application) and that
registry has no scrape-time callbacks, so this uses ``prometheus_client``.

The HTTP server runs in prometheus_client's thread; each scrape asks the broker's event loop
for the statuses and waits (bounded) for the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final
from wsgiref.simple_server import WSGIServer

from moleculerpy import ServiceBroker
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from moleculerpy_cqrs.broker.timings import append_timings
from moleculerpy_cqrs.core.states import DispatcherState, ProjectorState
from moleculerpy_cqrs.face.model import AggregateStatus, EventStoreStatus, status_from_answer

SCRAPE_TIMEOUT: Final = 5.0


@dataclass
class Statuses:
    """The statuses of this node's event stores and aggregates."""

    event_stores: list[EventStoreStatus] = field(default_factory=list)
    aggregates: list[AggregateStatus] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # services whose status() raised


async def local_statuses(broker: ServiceBroker) -> Statuses:
    """Ask every CQRS service on this node for its status."""
    found = Statuses()
    local = broker.node_catalog.local_node
    for info in local.services if local is not None else []:
        name = info.get("name") if isinstance(info, dict) else None
        service = broker.registry.get_service(name) if isinstance(name, str) else None
        status = getattr(getattr(service, "runtime", None), "status", None)
        if status is None or not callable(status):
            continue
        try:
            typed = status_from_answer(await status())
        except Exception:
            found.failed.append(str(name))
            continue
        if isinstance(typed, EventStoreStatus):
            found.event_stores.append(typed)
        elif isinstance(typed, AggregateStatus):
            found.aggregates.append(typed)
    return found


class NodeCollector(Collector):
    """Collects this node's CQRS figures when Prometheus scrapes."""

    def __init__(self, broker: ServiceBroker, loop: asyncio.AbstractEventLoop) -> None:
        self.broker = broker
        self.loop = loop

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(local_statuses(self.broker), self.loop)
        statuses = future.result(SCRAPE_TIMEOUT)
        yield from append_timings(self.broker).collect()
        yield from event_store_metrics(statuses.event_stores)
        yield from aggregate_metrics(statuses.aggregates)
        failed = GaugeMetricFamily(
            "cqrs_status_failed",
            "1 for each CQRS service on this node whose status could not be read.",
            labels=["service"],
        )
        for name in statuses.failed:
            failed.add_metric([name], 1)
        yield failed


def _gauge(name: str, text: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, labels=list(labels))


def _counter(name: str, text: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, labels=list(labels))


def event_store_metrics(statuses: list[EventStoreStatus]) -> Iterator[Metric]:
    labels = ("event_store",)
    head = _gauge("cqrs_event_store_head", "Position of the last stored event.", labels)
    appended = _counter(
        "cqrs_events_appended",
        "Events this node appended since it started (commands, map_event, snapshot events).",
        labels,
    )
    commits = _counter(
        "cqrs_event_store_commits", "Group commits this node made since it started.", labels
    )
    duplicates = _counter(
        "cqrs_event_store_duplicates",
        "Repeats of a stored idempotency key this node answered with the stored event.",
        labels,
    )
    cursor = _gauge("cqrs_dispatcher_cursor", "Position the dispatcher has settled.", labels)
    lag = _gauge("cqrs_dispatcher_lag_events", "Stored events not dispatched yet.", labels)
    delivered = _counter(
        "cqrs_dispatcher_delivered", "Events this node's dispatcher handed over.", labels
    )
    failed = _counter(
        "cqrs_dispatcher_failed", "Events marked failed after every delivery attempt.", labels
    )
    state = _gauge(
        "cqrs_dispatcher_state", "1 for the dispatcher's current state.", (*labels, "state")
    )
    held = _gauge(
        "cqrs_dispatcher_lease_held", "1 if this node holds the dispatcher's lease.", labels
    )
    holder = _gauge(
        "cqrs_dispatcher_lease_holder",
        "1 labelled with the node that holds (or last held) the dispatcher's lease.",
        (*labels, "node"),
    )
    for status in statuses:
        name = [status.name]
        d = status.dispatcher
        head.add_metric(name, status.head)
        appended.add_metric(name, status.appended)
        commits.add_metric(name, status.commits)
        duplicates.add_metric(name, status.duplicates)
        cursor.add_metric(name, d.cursor)
        lag.add_metric(name, d.lag)
        delivered.add_metric(name, d.delivered)
        failed.add_metric(name, d.failed)
        for each in DispatcherState:
            state.add_metric([*name, str(each)], 1 if each == d.state else 0)
        held.add_metric(name, 1 if d.lease and d.lease.mine else 0)
        if d.lease:
            holder.add_metric([*name, d.lease.node], 1)
    yield from (
        head,
        appended,
        commits,
        duplicates,
        cursor,
        lag,
        delivered,
        failed,
        state,
        held,
        holder,
    )


def aggregate_metrics(statuses: list[AggregateStatus]) -> Iterator[Metric]:
    labels = ("aggregate", "event_store")
    checkpoint = _gauge("cqrs_aggregate_checkpoint", "Position of the last event applied.", labels)
    head = _gauge("cqrs_aggregate_head", "Position of the last event in its log.", labels)
    lag_events = _gauge("cqrs_aggregate_lag_events", "Events not applied yet.", labels)
    lag_seconds = _gauge(
        "cqrs_aggregate_lag_seconds", "Age of the oldest event not applied yet.", labels
    )
    dead = _gauge("cqrs_aggregate_dead_letters", "Events in the dead letters.", labels)
    rows = _gauge("cqrs_aggregate_rows", "Rows in the aggregate.", labels)
    applied = _counter("cqrs_aggregate_applied", "Events this node's projector applied.", labels)
    state = _gauge(
        "cqrs_aggregate_state", "1 for the projector's current state.", (*labels, "state")
    )
    held = _gauge(
        "cqrs_aggregate_lease_held", "1 if this node holds the projector's lease.", labels
    )
    holder = _gauge(
        "cqrs_aggregate_lease_holder",
        "1 labelled with the node that holds (or last held) the projector's lease.",
        (*labels, "node"),
    )
    for status in statuses:
        name = [status.name, status.event_store or ""]
        checkpoint.add_metric(name, status.checkpoint)
        head.add_metric(name, status.head or 0)
        lag_events.add_metric(name, status.lag_events)
        lag_seconds.add_metric(name, status.lag_seconds)
        dead.add_metric(name, status.dead_letters)
        rows.add_metric(name, status.rows)
        applied.add_metric(name, status.applied)
        for each in ProjectorState:  # every state the core has: one series each
            state.add_metric([*name, str(each)], 1 if each == status.state else 0)
        held.add_metric(name, 1 if status.lease and status.lease.mine else 0)
        if status.lease:
            holder.add_metric([*name, status.lease.node], 1)
    yield from (checkpoint, head, lag_events, lag_seconds, dead, rows, applied, state, held)
    yield holder


class MetricsServer:
    """``/metrics`` of one node over HTTP, until :meth:`close`."""

    def __init__(self, server: WSGIServer, host: str) -> None:
        self._server = server
        self.host = host
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(broker: ServiceBroker, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve the node's metrics (port 0: any free port; see ``.url``). Call from the
    broker's event loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(broker, asyncio.get_running_loop()))
    ProcessCollector(registry=registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, host)
