"""Declared fields against the table that already holds them (schema drift), checked at start.

A store never changes a column's type, and a row written under the old declaration would read
back as the old type while queries check the new one. So a start whose declaration differs from
its existing table is refused with one line that names the field, both types and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from moleculerpy_cqrs.errors import ConfigurationError

AGGREGATE_REMEDY: Final = (
    "replay into a new aggregate table, or bump the aggregate's version "
    "(Aggregate(..., version=N)): its projector then rebuilds the table with these fields"
)
EVENT_LOG_REMEDY: Final = (
    "stored events keep their type: declare the field as it was, or add a field under a new name"
)


def refuse_aggregate_drift(
    name: str, declared: Mapping[str, str], stored: Mapping[str, str] | None
) -> None:
    """Raise :class:`ConfigurationError` unless aggregate ``name``'s ``declared`` fields are
    exactly its table's (``stored``, None: no table yet): same names, same types."""
    if stored is None:
        return
    problem = _type_change(declared, stored)
    if problem is None:
        missing = [f for f in declared if f not in stored]
        gone = [f for f in stored if f not in declared]
        if missing:
            problem = (
                f"field {missing[0]!r} ({declared[missing[0]]}) is declared but its table "
                "has no such column"
            )
        elif gone:
            problem = (
                f"field {gone[0]!r} ({stored[gone[0]]}) is in its table but no longer declared"
            )
    if problem is not None:
        raise ConfigurationError(f"aggregate {name!r}: {problem}; {AGGREGATE_REMEDY}")


def refuse_event_log_drift(
    name: str, declared: Mapping[str, str], stored: Mapping[str, str] | None
) -> None:
    """Raise :class:`ConfigurationError` if a declared field of event store ``name`` has
    another type in its table. A field declared since is fine: the store adds it, and the
    events stored before read it as null."""
    problem = None if stored is None else _type_change(declared, stored)
    if problem is not None:
        raise ConfigurationError(f"event store {name!r}: {problem}; {EVENT_LOG_REMEDY}")


def _type_change(declared: Mapping[str, str], stored: Mapping[str, str]) -> str | None:
    for field, kind in declared.items():
        held = stored.get(field)
        if held is not None and held != kind:
            return f"field {field!r} is declared {kind} but its table holds {held}"
    return None
