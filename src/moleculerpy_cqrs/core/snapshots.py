"""Snapshot strategies: how an aggregate is backed up (``snapshot=`` of an Aggregate)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

NO_BACKUP_ERROR: Final = (
    "aggregate.snapshot action failed. We could not backup the aggregate. Error: no backup strategy"
)
NOT_CONFIGURED_ERROR: Final = "snapshot not configured for this aggregate. eventStore is nil"


class SnapshotStrategy:
    """Where an aggregate's backups go; ``None`` when it has none."""

    def location(self, snapshot_id: str, aggregate: str) -> str | None:
        raise NotImplementedError


class _NoSnapshot(SnapshotStrategy):
    def location(self, snapshot_id: str, aggregate: str) -> str | None:
        return None

    def __repr__(self) -> str:
        return "NoSnapshot"


NoSnapshot: Final[SnapshotStrategy] = _NoSnapshot()


@dataclass(frozen=True)
class StoreBackup(SnapshotStrategy):
    """Back the aggregate up through its store's own backup, into
    ``<location>/<snapshotId>/<aggregate>`` (the Go library's layout)."""

    location_root: str | os.PathLike[str] = "backups"

    def location(self, snapshot_id: str, aggregate: str) -> str | None:
        return str(Path(self.location_root) / snapshot_id / aggregate)
