"""Every state the core reports shows in every face: the command line's tables, the
Prometheus metrics and the web page. A state added to ``core.states`` and not to a face fails
here, naming the face."""

from __future__ import annotations

import io
import re
from importlib.resources import files
from typing import Any

import pytest
from prometheus_client.core import Metric
from rich.console import Console

from moleculerpy_cqrs.core.states import DispatcherState, ProjectorState, SnapshotState
from moleculerpy_cqrs.face import tables
from moleculerpy_cqrs.face.metrics import aggregate_metrics, event_store_metrics
from moleculerpy_cqrs.face.model import (
    AggregateStatus,
    ClusterStatus,
    EventStoreStatus,
    status_from_answer,
)

PAGE = files("moleculerpy_cqrs.face.ui").joinpath("page.html").read_text(encoding="utf-8")


def aggregate_answer(state: str) -> dict[str, Any]:
    return {
        "kind": "aggregate", "name": "summary", "eventStore": "log", "state": state,
        "waitingFor": [], "checkpoint": 3, "head": 5, "lag": {"events": 2, "seconds": 1.5},
        "deadLetters": 1, "applied": 3, "haltedAt": None, "lastError": None, "rows": 2,
        "replay": None, "lease": {"node": "n1", "mine": True, "expiresIn": 3.0},
    }  # fmt: skip


def store_answer(state: DispatcherState) -> dict[str, Any]:
    return {
        "kind": "eventStore", "name": "log", "head": 5, "appended": 5, "commits": 2,
        "dispatcher": {"state": str(state), "running": state != "stopped",
                       "standby": state == "standby", "cursor": 4, "lag": 1, "delivered": 4,
                       "failed": 0, "lastError": None, "lease": None},
    }  # fmt: skip


def gauge(metrics: list[Metric], name: str) -> dict[str, float]:
    (family,) = [m for m in metrics if m.name == name]
    return {s.labels["state"]: s.value for s in family.samples}


def rendered(cluster: ClusterStatus, width: int = 200) -> str:
    console = Console(width=width, file=io.StringIO(), highlight=False, color_system=None)
    console.print(tables.status_view(cluster, width))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize("state", list(ProjectorState))
def test_each_projector_state_shows_in_every_face(state: ProjectorState) -> None:
    status = status_from_answer(aggregate_answer(str(state)), ["n1"])
    assert isinstance(status, AggregateStatus)
    assert status.state is state

    assert state in tables.PROJECTOR_STYLES, "the terminal tables have no style for it"
    cells = [c.strip() for c in rendered(ClusterStatus((), (status,))).split("│")]
    assert str(state) in cells, "the status table does not show it"

    states = gauge(list(aggregate_metrics([status])), "cqrs_aggregate_state")
    assert states[str(state)] == 1, "the metrics do not export it"
    assert sum(states.values()) == 1
    assert set(states) == {str(s) for s in ProjectorState}

    assert re.search(rf"\.state-{state}\b", PAGE), "the page has no style for it"


@pytest.mark.parametrize("state", list(DispatcherState))
def test_each_dispatcher_state_shows_in_every_face(state: DispatcherState) -> None:
    status = status_from_answer(store_answer(state), ["n1"])
    assert isinstance(status, EventStoreStatus)
    assert status.dispatcher.state is state
    assert state in tables.DISPATCHER_STYLES
    cells = [c.strip() for c in rendered(ClusterStatus((status,), ())).split("│")]
    assert str(state) in cells
    states = gauge(list(event_store_metrics([status])), "cqrs_dispatcher_state")
    assert states[str(state)] == 1
    assert set(states) == {str(s) for s in DispatcherState}
    assert re.search(rf"\.state-{state}\b", PAGE)


@pytest.mark.parametrize("state", list(SnapshotState))
def test_each_snapshot_state_shows_in_every_face(state: SnapshotState) -> None:
    assert state in tables.SNAPSHOT_STYLES
    assert re.search(rf"\.state-{state}\b", PAGE)


def test_an_unknown_projector_state_is_said_not_guessed() -> None:
    with pytest.raises(ValueError, match="unknown projector state 'dancing'"):
        status_from_answer(aggregate_answer("dancing"))
