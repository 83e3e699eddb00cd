"""What the operator sees, typed: the status of event stores and aggregates, dead letters,
snapshots, replay progress, pages of the log.

Each class is built from one action's answer (``from_answer``) and keeps that answer in
``raw`` for ``--json``. The command line's tables, the Prometheus metrics and the web page all
read these, never the answers' dicts, so a field read one way is read that way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from moleculerpy_cqrs.core.states import (
    DispatcherState,
    ProjectorState,
    ReplayState,
    SnapshotState,
)

Kind = Literal["event store", "aggregate"]


def _member[E: StrEnum](enum: type[E], value: Any) -> E | None:
    """``value`` as a member of ``enum``; None when it is not one."""
    try:
        return enum(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _opt_int(value: Any) -> int | None:
    return _int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class Lease:
    """Who holds (or last held) a lease: the others running the service stand by."""

    node: str
    mine: bool
    expires_in: float | None

    @classmethod
    def from_answer(cls, answer: Any) -> Lease | None:
        if not isinstance(answer, Mapping) or not answer.get("node"):
            return None
        expires = answer.get("expiresIn")
        return cls(
            str(answer["node"]),
            bool(answer.get("mine")),
            float(expires) if isinstance(expires, int | float) else None,
        )


def standby_nodes(nodes: Sequence[str], lease: Lease | None) -> tuple[str, ...]:
    """The nodes running a service other than the lease holder."""
    holder = lease.node if lease else None
    return tuple(node for node in nodes if node != holder)


@dataclass(frozen=True)
class DispatcherStatus:
    state: DispatcherState
    cursor: int
    lag: int
    delivered: int
    failed: int
    last_error: str | None
    lease: Lease | None

    @classmethod
    def from_answer(cls, answer: Any) -> DispatcherStatus:
        d = _dict(answer)
        state = _member(DispatcherState, d.get("state"))
        if state is None:  # a node without the ``state`` key: derived as it does
            state = (
                DispatcherState.STANDBY
                if d.get("standby")
                else DispatcherState.RUNNING
                if d.get("running")
                else DispatcherState.STOPPED
            )
        return cls(
            state=state,
            cursor=_int(d.get("cursor")),
            lag=_int(d.get("lag")),
            delivered=_int(d.get("delivered")),
            failed=_int(d.get("failed")),
            last_error=_opt_str(d.get("lastError")),
            lease=Lease.from_answer(d.get("lease")),
        )


@dataclass(frozen=True)
class EventStoreStatus:
    name: str
    nodes: tuple[str, ...]
    head: int
    appended: int
    commits: int
    dispatcher: DispatcherStatus
    versions: dict[str, int] = field(default_factory=dict)
    """The current version of each event (issue 15's event versions), when the node says."""
    renames: dict[str, str] = field(default_factory=dict)
    """Old event names read as new ones."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    kind: Kind = "event store"
    duplicates: int = 0  # repeats of an idempotency key answered with the stored event

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any], nodes: Sequence[str] = ()) -> EventStoreStatus:
        return cls(
            name=str(answer.get("name")),
            nodes=tuple(nodes),
            head=_int(answer.get("head")),
            appended=_int(answer.get("appended")),
            commits=_int(answer.get("commits")),
            dispatcher=DispatcherStatus.from_answer(answer.get("dispatcher")),
            versions={str(k): _int(v) for k, v in _dict(answer.get("versions")).items()},
            renames={str(k): str(v) for k, v in _dict(answer.get("renames")).items()},
            raw=dict(answer),
            duplicates=_int(answer.get("duplicates")),
        )

    @property
    def standby(self) -> tuple[str, ...]:
        return standby_nodes(self.nodes, self.dispatcher.lease)


@dataclass(frozen=True)
class ReplayProgress:
    state: ReplayState
    done: int
    total: int
    started: float
    finished: float | None
    error: str | None
    events_per_second: float
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_answer(cls, answer: Any) -> ReplayProgress | None:
        if not isinstance(answer, Mapping):
            return None
        state = _member(ReplayState, answer.get("state")) or ReplayState.IDLE
        finished = answer.get("finished")
        return cls(
            state=state,
            done=_int(answer.get("done")),
            total=_int(answer.get("total")),
            started=_float(answer.get("started")),
            finished=float(finished) if isinstance(finished, int | float) else None,
            error=_opt_str(answer.get("error")),
            events_per_second=_float(answer.get("events_per_second")),
            raw=dict(answer),
        )

    @property
    def active(self) -> bool:
        return self.state in (ReplayState.RUNNING, ReplayState.SWAPPING)

    @property
    def ended(self) -> bool:
        return self.state in (ReplayState.DONE, ReplayState.FAILED)

    @property
    def fraction(self) -> float:
        if self.state == ReplayState.DONE:
            return 1.0
        return min(self.done / self.total, 1.0) if self.total else 0.0


@dataclass(frozen=True)
class AggregateStatus:
    name: str
    nodes: tuple[str, ...]
    event_store: str | None
    state: ProjectorState
    waiting_for: tuple[str, ...]
    checkpoint: int
    head: int | None
    lag_events: int
    lag_seconds: float
    dead_letters: int
    applied: int
    halted_at: int | None
    last_error: str | None
    rows: int
    replay: ReplayProgress | None
    lease: Lease | None
    discarded_dead_letters: int = 0
    version: Any = None
    """This node's ``Aggregate(version=...)`` (``status()["version"]``)."""
    table_version: int | None = None
    """The version the table was built by (``status()["tableVersion"]``)."""
    rebuild: str | None = None
    """``"rebuilding v2: 43%, about 12 s left"`` or why the node does not project."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    kind: Kind = "aggregate"

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any], nodes: Sequence[str] = ()) -> AggregateStatus:
        lag = _dict(answer.get("lag"))
        state = _member(ProjectorState, answer.get("state"))
        if state is None:
            raise ValueError(
                f"unknown projector state {answer.get('state')!r} in {answer.get('name')}"
            )
        return cls(
            name=str(answer.get("name")),
            nodes=tuple(nodes),
            event_store=_opt_str(answer.get("eventStore")),
            state=state,
            waiting_for=tuple(str(a) for a in answer.get("waitingFor") or ()),
            checkpoint=_int(answer.get("checkpoint")),
            head=_opt_int(answer.get("head")),
            lag_events=_int(lag.get("events")),
            lag_seconds=_float(lag.get("seconds")),
            dead_letters=_int(answer.get("deadLetters")),
            applied=_int(answer.get("applied")),
            halted_at=_opt_int(answer.get("haltedAt")),
            last_error=_opt_str(answer.get("lastError")),
            rows=_int(answer.get("rows")),
            replay=ReplayProgress.from_answer(answer.get("replay")),
            lease=Lease.from_answer(answer.get("lease")),
            discarded_dead_letters=_int(answer.get("discardedDeadLetters")),
            version=answer.get("version"),
            table_version=_opt_int(answer.get("tableVersion")),
            rebuild=_opt_str(answer.get("rebuild")),
            raw=dict(answer),
        )

    @property
    def standby(self) -> tuple[str, ...]:
        return standby_nodes(self.nodes, self.lease)


@dataclass(frozen=True)
class Unreachable:
    """A service whose status could not be read (it is listed, with why)."""

    name: str
    kind: Kind
    nodes: tuple[str, ...]
    error: str


ServiceStatus = EventStoreStatus | AggregateStatus | Unreachable


def status_from_answer(answer: Any, nodes: Sequence[str] = ()) -> ServiceStatus | None:
    """An event store's or an aggregate's status, told apart by the answer's ``kind``; None
    for anything else."""
    if not isinstance(answer, Mapping):
        return None
    if answer.get("kind") == "eventStore":
        return EventStoreStatus.from_answer(answer, nodes)
    if answer.get("kind") == "aggregate":
        return AggregateStatus.from_answer(answer, nodes)
    return None


@dataclass(frozen=True)
class ClusterStatus:
    """Every event store and aggregate the cluster has, each event store followed by the
    aggregates it feeds; what could not be read last."""

    event_stores: tuple[EventStoreStatus, ...]
    aggregates: tuple[AggregateStatus, ...]
    unreachable: tuple[Unreachable, ...] = ()

    def ordered(self) -> list[ServiceStatus]:
        def key(s: ServiceStatus) -> tuple[str, int, str]:
            if isinstance(s, EventStoreStatus):
                return (s.name, 0, s.name)
            if isinstance(s, AggregateStatus):
                return (s.event_store or "\uffff", 1, s.name)
            return ("\uffff", 2, s.name)

        return sorted([*self.event_stores, *self.aggregates, *self.unreachable], key=key)

    def aggregate(self, name: str) -> AggregateStatus | None:
        return next((a for a in self.aggregates if a.name == name), None)

    def event_store(self, name: str) -> EventStoreStatus | None:
        return next((e for e in self.event_stores if e.name == name), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "eventStores": [s.raw for s in self.event_stores],
            "aggregates": [s.raw for s in self.aggregates],
            **(
                {"unreachable": [{"name": u.name, "error": u.error} for u in self.unreachable]}
                if self.unreachable
                else {}
            ),
        }


@dataclass(frozen=True)
class DeadLetter:
    id: int
    event_id: int | None
    event: str
    handler: str | None
    kind: str | None
    attempts: int
    error: str | None
    created: int | None
    updated: int | None
    record: dict[str, Any]

    @classmethod
    def from_answer(cls, row: Mapping[str, Any]) -> DeadLetter:
        return cls(
            id=_int(row.get("id")),
            event_id=_opt_int(row.get("eventId")),
            event=str(row.get("event") or ""),
            handler=_opt_str(row.get("handler")),
            kind=_opt_str(row.get("kind")),
            attempts=_int(row.get("attempts")),
            error=_opt_str(row.get("error")),
            created=_opt_int(row.get("created")),
            updated=_opt_int(row.get("updated")),
            record=_dict(row.get("record")),
        )


@dataclass(frozen=True)
class Page[T]:
    """One page of a ``list`` answer."""

    rows: tuple[T, ...]
    total: int
    page: int
    page_size: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_pages(self) -> int:
        return math.ceil(self.total / self.page_size) if self.total and self.page_size else 0

    @property
    def past_the_end(self) -> bool:
        return bool(self.total) and self.page > self.total_pages

    def caption(self) -> str:
        """``page 2 of 3, 45 in all``; past the last page it says there is nothing there."""
        if self.past_the_end:
            return (
                f"page {self.page} is past the last page ({self.total_pages}); {self.total} in all"
            )
        return f"page {self.page} of {self.total_pages}, {self.total} in all"


def dead_letter_page(answer: Mapping[str, Any]) -> Page[DeadLetter]:
    rows = tuple(DeadLetter.from_answer(r) for r in answer.get("rows") or ())
    return Page(
        rows, _int(answer.get("total")), _int(answer.get("page"), 1),
        _int(answer.get("pageSize"), 20), dict(answer),
    )  # fmt: skip


def event_page(answer: Mapping[str, Any]) -> Page[dict[str, Any]]:
    rows = tuple(dict(r) for r in answer.get("rows") or () if isinstance(r, Mapping))
    return Page(
        rows, _int(answer.get("total")), _int(answer.get("page"), 1),
        _int(answer.get("pageSize"), 20), dict(answer),
    )  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    status: SnapshotState | str
    checkpoint: int | None
    size: int | None
    created: int | None
    updated: int | None
    location: str | None
    error: str | None
    event_id: int | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_answer(cls, row: Mapping[str, Any]) -> Snapshot:
        status = row.get("status")
        return cls(
            snapshot_id=str(row.get("snapshotId") or ""),
            status=_member(SnapshotState, status) or str(status),
            checkpoint=_opt_int(row.get("checkpoint")),
            size=_opt_int(row.get("size")),
            created=_opt_int(row.get("created")),
            updated=_opt_int(row.get("updated")),
            location=_opt_str(row.get("location")),
            error=_opt_str(row.get("error")),
            event_id=_opt_int(row.get("eventId")),
            raw=dict(row),
        )


@dataclass(frozen=True)
class RetryFailure:
    id: int
    error: str


@dataclass(frozen=True)
class RetryResult:
    retried: int
    failed: tuple[RetryFailure, ...]
    remaining: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> RetryResult:
        failed = answer.get("failed") or []
        return cls(
            retried=_int(answer.get("retried")),
            failed=tuple(
                RetryFailure(_int(f.get("id")), str(f.get("error")))
                for f in (failed if isinstance(failed, list) else [])
                if isinstance(f, Mapping)
            ),
            remaining=_int(answer.get("remaining")),
            raw=dict(answer),
        )
