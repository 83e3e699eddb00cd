"""moleculerpy-cqrs: CQRS for MoleculerPy services.

Commands are saved as events the moment they arrive; the event store dispatches them to
subscribers and feeds aggregates (read models) through transformations.
"""

from __future__ import annotations

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.broker.aggregate import Aggregate
from moleculerpy_cqrs.broker.eventstore import EventStore
from moleculerpy_cqrs.core.records import EventType, Status
from moleculerpy_cqrs.core.snapshots import NoSnapshot, StoreBackup
from moleculerpy_cqrs.core.upcast import Upcasted
from moleculerpy_cqrs.errors import (
    ConfigurationError,
    Conflict,
    ConflictError,
    CqrsError,
    EntityNotFound,
    EntityNotFoundError,
    InvalidInput,
    ReadOnlyAggregateError,
    ResponseTooLargeError,
    StoreError,
)

__all__ = [
    "Aggregate",
    "ConfigurationError",
    "Conflict",
    "ConflictError",
    "CqrsError",
    "EntityNotFound",
    "EntityNotFoundError",
    "EventStore",
    "EventType",
    "InvalidInput",
    "NoSnapshot",
    "ReadOnlyAggregateError",
    "ResponseTooLargeError",
    "Status",
    "StoreBackup",
    "StoreError",
    "Upcasted",
    "stores",
]
__version__ = "0.1.0"
