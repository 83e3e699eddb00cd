"""What a serving node keeps of the aggregate while it runs serial calls (``broker/remote.py``):
find answers and key rows, patched by each call's answer as the projector will apply it.

A kept answer is only ever a guess: the projector checks every read a call made against its
batch before it uses the call's answer (``core/remote.py``). So a guess may be wrong, but
should seldom be; what cannot be patched exactly (a new row, whose id is the projector's to
give; a removal) is forgotten. Each answer costs in proportion to the kept answers it
touches: rows are indexed by id, find answers by the fields their filter tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from moleculerpy_cqrs.core.port import KeyRows
from moleculerpy_cqrs.stores.fields import ID, Record
from moleculerpy_cqrs.stores.query import (
    And,
    Between,
    Compare,
    Condition,
    In,
    IsNull,
    Like,
    Or,
    Search,
    matches,
)

FINDS_KEPT: Final = 256  # find answers kept (the least recently added go)
KEYS_KEPT: Final = 4096  # keys whose rows are kept
ANY: Final = "*"  # in the index by field: a filter that may test any field


@dataclass
class _Find:
    where: Condition | None
    rows: dict[int, Record]  # by id, in the answer's order
    tests: frozenset[str] | None  # the fields the filter tests (None: any)


@dataclass
class _Key:
    field: str
    value: Any
    rows: dict[int, Record]


class Kept:
    """The find answers (by their params' canonical form) and key rows (by the key's) of one
    serial session, with ``fields`` the aggregate's."""

    def __init__(self, fields: dict[str, Any] | None) -> None:
        self.fields = fields
        self._finds: dict[str, _Find] = {}
        self._holding: dict[int, set[str]] = {}  # row id -> finds holding it
        self._testing: dict[str, set[str]] = {}  # field (or ANY) -> finds testing it
        self._keys: dict[str, _Key] = {}
        self._key_holding: dict[int, set[str]] = {}  # row id -> keys holding it
        self._key_fields: dict[str, set[str]] = {}  # field -> keys of that field

    # ------------------------------------------------------------------ finds

    def find(self, name: str) -> list[Record] | None:
        kept = self._finds.get(name)
        return None if kept is None else [dict(r) for r in kept.rows.values()]

    def keep_find(self, name: str, where: Condition | None, rows: list[Any]) -> None:
        if not all(isinstance(r, dict) and isinstance(r.get(ID), int) for r in rows):
            return
        self._drop_find(name)
        tests = _tests(where)
        self._finds[name] = _Find(where, {r[ID]: dict(r) for r in rows}, tests)
        for row_id in self._finds[name].rows:
            self._holding.setdefault(row_id, set()).add(name)
        for f in (ANY,) if tests is None else tests:
            self._testing.setdefault(f, set()).add(name)
        if len(self._finds) > FINDS_KEPT:
            self._drop_find(next(iter(self._finds)))

    def _drop_find(self, name: str) -> None:
        kept = self._finds.pop(name, None)
        if kept is None:
            return
        for row_id in kept.rows:
            _discard(self._holding, row_id, name)
        for f in (ANY,) if kept.tests is None else kept.tests:
            _discard(self._testing, f, name)

    # ------------------------------------------------------------------ key rows

    def key_rows(self, sent: KeyRows) -> KeyRows:
        """The rows of ``sent``'s key as kept (those ``sent`` carries may be older); kept
        from ``sent`` when there are none."""
        name = _key_name(sent.field, sent.value)
        kept = self._keys.get(name)
        if kept is None:
            if not all(isinstance(r.get(ID), int) for r in sent.rows):
                return sent
            kept = self._keys[name] = _Key(sent.field, sent.value, {r[ID]: r for r in sent.rows})
            for row_id in kept.rows:
                self._key_holding.setdefault(row_id, set()).add(name)
            self._key_fields.setdefault(sent.field, set()).add(name)
            if len(self._keys) > KEYS_KEPT:
                self._drop_key(next(iter(self._keys)))
        return KeyRows(kept.field, kept.value, list(kept.rows.values()))

    def kept_key(self, field: str, value: Any) -> list[Record] | None:
        """The rows kept for a key (None: none are)."""
        kept = self._keys.get(_key_name(field, value))
        return None if kept is None else [dict(r) for r in kept.rows.values()]

    def _drop_key(self, name: str) -> None:
        kept = self._keys.pop(name, None)
        if kept is None:
            return
        for row_id in kept.rows:
            _discard(self._key_holding, row_id, name)
        _discard(self._key_fields, kept.field, name)

    # ------------------------------------------------------------------ answers

    def clear(self) -> None:
        for name in list(self._finds):
            self._drop_find(name)
        for name in list(self._keys):
            self._drop_key(name)

    def absorb(self, kind: Any, answer: Any, event_id: Any) -> None:
        """A call answered: patch what is kept as the projector will apply the answer (a
        partial update of a row by id, stamped with the event's id when the aggregate has an
        ``eventId`` field); forget what a new row may belong to; anything else may change
        anything: forget it all."""
        if answer is None or not (self._finds or self._keys):
            return
        if not isinstance(answer, dict) or kind not in ("create", "update"):
            self.clear()
        elif ID not in answer:
            self._added(answer)
        elif kind == "update" and isinstance(answer[ID], int):
            changes = {k: v for k, v in answer.items() if k != ID}
            if self.fields is not None and "eventId" in self.fields and "eventId" not in changes:
                changes["eventId"] = event_id
            self._updated(answer[ID], changes)
        else:
            self.clear()

    def _updated(self, row_id: int, changes: dict[str, Any]) -> None:
        for name in list(self._key_holding.get(row_id, ())):
            kept = self._keys[name]
            patched = {**kept.rows[row_id], **changes}
            if kept.field in changes and not _same(patched[kept.field], kept.value):
                del kept.rows[row_id]  # the row moved to another key
                _discard(self._key_holding, row_id, name)
            else:
                kept.rows[row_id] = patched
        for f in self._key_fields.keys() & changes.keys():
            name = _key_name(f, changes[f])
            if name not in self._key_holding.get(row_id, ()):
                self._drop_key(name)  # the row may move to that key
        holding = self._holding.get(row_id, set())
        for name in list(holding):
            found = self._finds[name]
            patched = {**found.rows[row_id], **changes}
            if matches(found.where, patched):
                found.rows[row_id] = patched
            else:
                del found.rows[row_id]
                _discard(self._holding, row_id, name)
        # A find that tests a changed field and does not hold the row: it may come to.
        touched = set(self._testing.get(ANY, ()))
        for f in changes:
            touched |= self._testing.get(f, set())
        for name in touched - self._holding.get(row_id, set()):
            self._drop_find(name)

    def _added(self, row: dict[str, Any]) -> None:
        for name, found in list(self._finds.items()):
            absent = found.tests is None or any(f not in row for f in found.tests)
            if absent or matches(found.where, row):
                self._drop_find(name)
        for f in list(self._key_fields):
            if f in row:  # a row without the field belongs to no key sent (None is none)
                self._drop_key(_key_name(f, row[f]))


def _key_name(field: str, value: Any) -> str:
    return f"{field}\x00{type(value).__name__}\x00{value!r}"


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _discard(index: dict[Any, set[str]], at: Any, name: str) -> None:
    names = index.get(at)
    if names is not None:
        names.discard(name)
        if not names:
            del index[at]


def _tests(where: Condition | None) -> frozenset[str] | None:
    """The fields ``where`` tests; None when it may test any."""
    if where is None:
        return frozenset()
    if isinstance(where, And | Or):
        out: set[str] = set()
        for item in where.items:
            got = _tests(item)
            if got is None:
                return None
            out |= got
        return frozenset(out)
    if isinstance(where, Search):
        return frozenset(where.fields) if where.fields else None
    if isinstance(where, Compare | Like | In | Between | IsNull):
        return frozenset((where.field,))
    return None
