"""A batch's keyed reads, fetched together before its transformations run.

Marten calls this event slicing: the engine knows from each event which row its
transformation will read, so it reads all of them at once. Here that knowledge comes from a
binding's ``key``: ``on("account.deposited").update(t, key="accountId")`` says that the
event's ``payload.accountId`` names the row it is about. Before a batch's transformations run,
every row whose aggregate field holds one of the batch's keys is read in one query per field
(:meth:`~.batch.BatchView.prefetch`); a transformation's ``find {"accountId": x}`` is then
answered from those rows merged with the batch's own effects, with no round trip to the store.

Which aggregate field a key is matched against (:func:`key_field`):

- ``key_field="accountId"`` on the binding names it (the key may then be any payload field or
  a function of the event);
- otherwise a ``key`` that is a payload field's name maps to the aggregate field of the same
  name, when the aggregate declares one;
- otherwise nothing is prefetched for that binding (its reads go to the store as before).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

from moleculerpy_cqrs.core.batch import PREFETCH_CHUNK, BatchView, EarlyRows, checked_values
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.stores.fields import FieldType, Record
from moleculerpy_cqrs.stores.ports import ReadModel
from moleculerpy_cqrs.stores.query import In, Query


class KeyedBinding(Protocol):
    @property
    def key(self) -> Any: ...

    @property
    def key_field(self) -> str | None: ...

    @property
    def handler_name(self) -> str: ...

    def key_of(self, event: Record) -> Any: ...


def key_field(binding: KeyedBinding, fields: Mapping[str, FieldType]) -> str | None:
    """The aggregate field a binding's keys are matched against (None: no prefetch)."""
    if binding.key is None:
        return None
    if binding.key_field is not None:
        return binding.key_field
    if isinstance(binding.key, str) and fields.get(binding.key) not in (None, "json"):
        return binding.key
    return None


def check_key_fields(bindings: Sequence[KeyedBinding], fields: Mapping[str, FieldType]) -> None:
    """Refuse a ``key_field`` that is not a declared field of the aggregate (or needs a key)."""
    for binding in bindings:
        name = binding.key_field
        if name is None:
            continue
        if binding.key is None:
            raise ConfigurationError(
                f"{binding.handler_name}: key_field={name!r} needs a key (key=...)"
            )
        if fields.get(name) in (None, "json"):
            raise ConfigurationError(
                f"{binding.handler_name}: key_field={name!r} must name a declared field of the "
                f"aggregate that is not json; declared: {sorted(fields)}"
            )


def keys_by_field(
    units: Sequence[tuple[Record, KeyedBinding]], fields: Mapping[str, FieldType]
) -> dict[str, list[Hashable]]:
    """The keys the keyed bindings of ``units`` will look up, by aggregate field."""
    wanted: dict[str, dict[Hashable, None]] = {}
    slots: dict[int, str | None] = {}
    for event, binding in units:
        slot = id(binding)
        if slot not in slots:
            slots[slot] = key_field(binding, fields)
        name = slots[slot]
        if name is None:
            continue
        wanted.setdefault(name, {})[binding.key_of(event)] = None
    return {name: list(keys) for name, keys in wanted.items()}


async def prefetch_keys(
    view: BatchView,
    units: Sequence[tuple[Record, KeyedBinding]],
    early: Mapping[str, EarlyRows] | None = None,
) -> None:
    """Read every committed row the keyed bindings of ``units`` will look up: one query per
    aggregate field (per few thousand keys), or none for the keys ``early`` read already."""
    for name, keys in keys_by_field(units, view.fields).items():
        await view.prefetch(name, keys, None if early is None else early.get(name))


async def read_keys_early(
    table: ReadModel,
    units: Sequence[tuple[Record, KeyedBinding]],
    over: Callable[[], list[BatchView]],
) -> dict[str, EarlyRows]:
    """The table's rows for the keys of ``units`` (a batch not begun yet), read now; ``over``
    answers, as the read begins, the views whose effects it may miss (:class:`EarlyRows`)."""
    fields = dict(table.fields)
    wanted = {n: checked_values(fields, n, k) for n, k in keys_by_field(units, fields).items()}
    missed = over()
    out: dict[str, EarlyRows] = {}
    for name, values in wanted.items():
        rows: list[Record] = []
        chunks = range(0, len(values), PREFETCH_CHUNK)
        for start in chunks:
            chunk = tuple(values[start : start + PREFETCH_CHUNK])
            rows += await table.find(Query(where=In(name, chunk)))
        out[name] = EarlyRows(name, values, rows, missed, len(chunks))
    return out
