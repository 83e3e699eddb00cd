"""How long ``map_action`` appends take on one broker, as Prometheus metrics.

One :class:`AppendTimings` per broker (kept on the broker instance, as the compat state is),
made on first use; the metrics are not registered anywhere: ``face.metrics`` exposes them
beside the status figures it collects at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from moleculerpy import ServiceBroker
from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric

from moleculerpy_cqrs.errors import ConflictError, InvalidInput

_ATTR: Final = "_moleculerpy_cqrs_append_timings"

BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds: an append answers once its group commit is durable (about a millisecond on SQLite
with fsync here, more under load or on a remote PostgreSQL)."""


class Outcome:
    """What a measured call turned out to be, beyond its exception (set by the caller)."""

    __slots__ = ("duplicate",)

    def __init__(self) -> None:
        self.duplicate = False


class AppendTimings:
    """Appends by outcome, and the latency of the stored ones, per event store and action."""

    def __init__(self) -> None:
        labels = ("event_store", "action")
        self.seconds = Histogram(
            "cqrs_append_seconds",
            "Time from a map_action call to its durable answer (stored appends only).",
            labels,
            buckets=BUCKETS,
            registry=None,
        )
        self.calls = Counter(
            "cqrs_append_calls",
            "map_action calls by result: stored, duplicate (a repeated idempotency key, "
            "answered the stored event), refused (bad input, 422), conflict (a key held by "
            "other params, 409) or failed.",
            (*labels, "result"),
            registry=None,
        )

    @contextmanager
    def measure(self, event_store: str, action: str) -> Iterator[Outcome]:
        started = time.perf_counter()
        outcome = Outcome()
        try:
            yield outcome
        except InvalidInput:
            self.calls.labels(event_store, action, "refused").inc()
            raise
        except ConflictError:
            self.calls.labels(event_store, action, "conflict").inc()
            raise
        except BaseException:
            self.calls.labels(event_store, action, "failed").inc()
            raise
        if outcome.duplicate:
            self.calls.labels(event_store, action, "duplicate").inc()
            return
        self.seconds.labels(event_store, action).observe(time.perf_counter() - started)
        self.calls.labels(event_store, action, "stored").inc()

    def collect(self) -> list[Metric]:
        return [*self.seconds.collect(), *self.calls.collect()]


def append_timings(broker: ServiceBroker) -> AppendTimings:
    """The broker's append timings (made on first use)."""
    found: Any = getattr(broker, _ATTR, None)
    if isinstance(found, AppendTimings):
        return found
    timings = AppendTimings()
    setattr(broker, _ATTR, timings)
    return timings
