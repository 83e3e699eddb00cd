"""``cqrs status`` shows a rebuild's progress and why an outdated node does not project."""

from __future__ import annotations

from moleculerpy_cqrs.core.states import DispatcherState
from moleculerpy_cqrs.face.model import (
    AggregateStatus,
    ClusterStatus,
    EventStoreStatus,
    status_from_answer,
)
from tests.face.test_states import aggregate_answer, rendered, store_answer


def test_the_table_shows_rebuilding_with_its_progress_and_time_left() -> None:
    answer = {
        **aggregate_answer("rebuilding"),
        "version": 2,
        "tableVersion": 1,
        "rebuild": "rebuilding v2: 43%, about 12 s left",
    }
    status = status_from_answer(answer, ["n1"])
    assert isinstance(status, AggregateStatus)
    assert (status.version, status.table_version) == (2, 1)
    assert "rebuilding v2: 43%, about 12 s left" in rendered(ClusterStatus((), (status,)))


def test_the_table_says_why_an_outdated_node_does_not_project() -> None:
    answer = {**aggregate_answer("outdated"), "version": 1, "tableVersion": 2, "rebuild": "x"}
    status = status_from_answer(answer, ["n1"])
    assert isinstance(status, AggregateStatus)
    assert "outdated (this node v1, the table v2)" in rendered(ClusterStatus((), (status,)))


def test_the_notes_give_each_event_past_version_1_and_the_renames() -> None:
    answer = {
        **store_answer(DispatcherState.RUNNING),
        "versions": {"profile.created": 1, "profile.updated": 2},
        "renames": {"profile.changed": "profile.updated"},
    }
    status = status_from_answer(answer, ["n1"])
    assert isinstance(status, EventStoreStatus)
    assert "log: events at their version profile.updated v2; read renamed profile.changed -> " \
        "profile.updated" in rendered(ClusterStatus((status,), ()))  # fmt: skip
