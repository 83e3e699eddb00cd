"""The states the core reports in ``status``: one list each, which every face renders.

The command line's tables, the Prometheus metrics and the web page iterate these enums (and
their tests check each face has a way to show every member), so a state added here shows up
everywhere, or a test says where it does not.
"""

from __future__ import annotations

from enum import StrEnum


class ProjectorState(StrEnum):
    """What an aggregate's projector is doing (``status()["state"]``)."""

    RUNNING = "running"
    """Applying events as they come (or idle, caught up)."""
    STANDBY = "standby"
    """Another node holds the lease; this one takes over when it lapses."""
    WAITING = "waiting"
    """Started, but some transformation action is served by no node yet."""
    PAUSED = "paused"
    """Held still for a snapshot, a restore or a replay's swap."""
    HALTED = "halted"
    """``on_error="halt"``: stopped at a failing event until it is retried."""
    STOPPED = "stopped"
    """Not running on this node."""


class DispatcherState(StrEnum):
    """What an event store's dispatcher is doing (``status()["dispatcher"]["state"]``)."""

    RUNNING = "running"
    STANDBY = "standby"
    STOPPED = "stopped"


class ReplayState(StrEnum):
    """Where a replay is (``status()["replay"]["state"]``)."""

    IDLE = "idle"
    RUNNING = "running"
    SWAPPING = "swapping"
    DONE = "done"
    FAILED = "failed"


class SnapshotState(StrEnum):
    """A snapshot's status in ``snapshots()``."""

    CREATED = "created"
    COMPLETED = "completed"
    FAILED = "failed"
