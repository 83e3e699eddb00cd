"""Compiling a checked :class:`Query` to SQL for the SQL backends.

Only identifiers that passed :func:`declare_fields` (or ``id``) are ever written into SQL, always
double-quoted; every value travels as a bound parameter. A :class:`Dialect` says how each
backend spells placeholders, case-sensitive LIKE and values.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, Final

from moleculerpy_cqrs.stores.fields import ID, FieldType, Record
from moleculerpy_cqrs.stores.query import (
    And,
    Between,
    Compare,
    Condition,
    Contains,
    In,
    IsNull,
    Like,
    Not,
    Or,
    Query,
    Search,
    escape_like,
    fold_case,
)

Params = list[Any]


class Dialect(ABC):
    placeholder: str = "?"

    @abstractmethod
    def encode(self, kind: FieldType | None, value: Any) -> Any:
        """A checked Python value as the driver should bind it (``kind`` None is ``id``)."""

    @abstractmethod
    def like(self, column: str, negate: bool) -> str:
        """SQL for a case-sensitive LIKE of ``column`` against one placeholder pattern that
        uses ``\\`` as its escape character."""

    def like_pattern(self, pattern: str) -> Any:
        """The parameter bound for :meth:`like`. By default the pattern itself, except that a
        trailing lone ``\\`` is doubled: it means a literal backslash (as in :func:`matches`),
        where SQL would reject it or never match."""
        trailing = len(pattern) - len(pattern.rstrip("\\"))
        return pattern + "\\" if trailing % 2 else pattern

    def contains_ci(self, column: str) -> str:
        """SQL for a LIKE of ``column`` lowercased as :func:`fold_case` does (the pattern is
        lowercased so already)."""
        return f"lower({column}) LIKE {self.placeholder} ESCAPE '\\'"

    def contains_text(self, column: str) -> str:
        """SQL for a LIKE of an integer ``column``'s decimal text (``search`` in an integer
        field; digits have no case)."""
        return f"CAST({column} AS TEXT) LIKE {self.placeholder} ESCAPE '\\'"

    def json_contains(self, column: str, value: str | int | float | bool) -> tuple[str, Params]:
        """SQL (and its parameters) for: the json ``column`` is an array with an element equal
        to ``value`` as JSON compares (true is not 1, 1 is 1.0), or is that value itself."""
        raise NotImplementedError(f"{type(self).__name__} has no json membership")

    def in_list(self, column: str, kind: FieldType | None, negate: bool, count: int) -> str:
        """SQL for ``column`` (NOT) IN the values, which are bound as :meth:`in_params`."""
        marks = ", ".join(self.placeholder for _ in range(count))
        return f"{column} {'NOT ' if negate else ''}IN ({marks})"

    def in_params(self, kind: FieldType | None, values: list[Any]) -> Params:
        return values

    def order(self, column: str, descending: bool) -> str:
        return f"{column} DESC NULLS LAST" if descending else f"{column} ASC NULLS FIRST"


def quote(name: str) -> str:
    """A checked identifier, double-quoted. Refuses anything that is not an identifier."""
    if not name.isidentifier() or not name.isascii():
        raise ValueError(f"not an identifier: {name!r}")
    return f'"{name}"'


_MAX_NAME: Final = 63  # PostgreSQL's limit, in bytes (names are ASCII); SQLite has none
OWN_INDEX: Final = re.compile(r".*\$(ix|ux)")
"""The names of the indexes this toolkit makes for declared fields (and only those)."""


def index_name(table: str, field: str, unique: bool) -> str:
    """The quoted name of the index of a declared ``field`` of ``table``: deterministic, at
    most 63 bytes, and different for a unique index (so a change of the flag makes a new one).
    ``$`` never occurs in a store or field name, so it never collides with a table's name."""
    tag = "ux" if unique else "ix"
    name = f"{table}${field}${tag}"
    if len(name) > _MAX_NAME:
        digest = hashlib.blake2b(f"{table}\0{field}".encode(), digest_size=6).hexdigest()
        name = f"{table[:20]}${field[:20]}${digest}${tag}"
    if not OWN_INDEX.fullmatch(name) or not name.replace("$", "_").isidentifier():
        raise ValueError(f"not an identifier: {name!r}")
    return f'"{name}"'


def quote_index(name: str) -> str:
    """An index name read from a catalog, quoted, if it is one of ours (else ValueError)."""
    if not OWN_INDEX.fullmatch(name) or not name.replace("$", "_").isidentifier():
        raise ValueError(f"not an index of ours: {name!r}")
    return f'"{name}"'


def is_own_index(name: str) -> bool:
    return bool(OWN_INDEX.fullmatch(name)) and name.replace("$", "_").isidentifier()


def index_statements(table: str, qualified: str, indexes: Mapping[str, bool]) -> list[str]:
    """CREATE [UNIQUE] INDEX IF NOT EXISTS for each indexed field (name -> unique) of the
    table named ``table`` (whose index names these are) at ``qualified``."""
    return [
        f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS "
        f"{index_name(table, field, unique)} ON {qualified} ({quote(field)})"
        for field, unique in indexes.items()
    ]


class Compiler:
    """SQL for one table of declared ``fields`` in one ``dialect``."""

    def __init__(self, table: str, fields: Mapping[str, FieldType], dialect: Dialect) -> None:
        self.table = quote(table)
        self.fields = fields
        self.dialect = dialect
        self.columns = [ID, *fields]
        self._selects: dict[Query, tuple[str, Params]] = {}
        self._statements: dict[tuple[str, tuple[str, ...]], str] = {}

    def kind(self, name: str) -> FieldType | None:
        return None if name == ID else self.fields[name]

    def where(self, cond: Condition | None) -> tuple[str, Params]:
        if cond is None:
            return "", []
        params: Params = []
        return " WHERE " + self._cond(cond, params), params

    def select(self, query: Query) -> tuple[str, Params]:
        """The SELECT for ``query`` (a few hundred recent queries are kept compiled)."""
        try:
            sql, params = self._selects[query]
        except TypeError:  # a json value in the query: not hashable, compile each time
            return self._select(query)
        except KeyError:
            sql, params = self._select(query)
            if len(self._selects) >= 256:
                self._selects.pop(next(iter(self._selects)))
            self._selects[query] = (sql, params)
        return sql, list(params)

    def _select(self, query: Query) -> tuple[str, Params]:
        cols = ", ".join(quote(c) for c in (query.fields or self.columns))
        where, params = self.where(query.where)
        order = ", ".join(
            self.dialect.order(quote(n), desc) for n, desc in (*query.sort, (ID, False))
        )
        sql = f"SELECT {cols} FROM {self.table}{where} ORDER BY {order}"
        p = self.dialect.placeholder
        if query.limit is not None:
            sql += f" LIMIT {p}"
            params.append(query.limit)
        elif query.offset:
            sql += " LIMIT -1" if p == "?" else " LIMIT ALL"
        if query.offset:
            sql += f" OFFSET {p}"
            params.append(query.offset)
        return sql, params

    def count(self, query: Query) -> tuple[str, Params]:
        where, params = self.where(query.where)
        return f"SELECT count(*) FROM {self.table}{where}", params

    def update(self, query: Query, changes: Mapping[str, Any]) -> tuple[str, Params]:
        p = self.dialect.placeholder
        sets = ", ".join(f"{quote(k)} = {p}" for k in changes)
        params: Params = [self.dialect.encode(self.kind(k), v) for k, v in changes.items()]
        where, wparams = self.where(query.where)
        return f"UPDATE {self.table} SET {sets}{where}", params + wparams

    def delete(self, query: Query) -> tuple[str, Params]:
        where, params = self.where(query.where)
        return f"DELETE FROM {self.table}{where}", params

    def insert(self, names: list[str]) -> str:
        key = ("insert", tuple(names))
        sql = self._statements.get(key)
        if sql is None:
            sql = self._statements[key] = self._insert(names)
        return sql

    def update_by_id(self, names: tuple[str, ...]) -> str:
        """UPDATE of the columns ``names`` of one row: the values, then the id, bound."""
        key = ("update", names)
        sql = self._statements.get(key)
        if sql is None:
            p = self.dialect.placeholder
            sets = ", ".join(f"{quote(n)} = {p}" for n in names)
            sql = self._statements[key] = f"UPDATE {self.table} SET {sets} WHERE id = {p}"
        return sql

    def row_params(self, rows: Iterable[Record]) -> list[list[Any]]:
        """Whole rows as :meth:`insert` of ``[id, *fields]`` binds them (a missing id is
        None: the database chooses one)."""
        encode, kinds = self.dialect.encode, tuple(self.fields.items())
        return [[row.get(ID), *[encode(k, row.get(n)) for n, k in kinds]] for row in rows]

    def grouped_updates(
        self, updates: Mapping[int, Record]
    ) -> list[tuple[tuple[str, ...], str, list[list[Any]]]]:
        """A batch's updates (id -> the fields to change) grouped by the columns they change:
        for each group, the columns, its :meth:`update_by_id` and the rows of parameters
        (values, then the id), so that each group is one ``executemany``."""
        encode, fields = self.dialect.encode, self.fields
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for entity_id, changed in updates.items():
            names = tuple(changed)
            values = [encode(fields[n], changed[n]) for n in names]
            values.append(entity_id)
            groups.setdefault(names, []).append(values)
        return [(names, self.update_by_id(names), rows) for names, rows in groups.items()]

    def _insert(self, names: list[str]) -> str:
        if not names:
            return f"INSERT INTO {self.table} DEFAULT VALUES"
        p = self.dialect.placeholder
        cols = ", ".join(quote(n) for n in names)
        return f"INSERT INTO {self.table} ({cols}) VALUES ({', '.join(p for _ in names)})"

    def _cond(self, cond: Condition, params: Params) -> str:
        p = self.dialect.placeholder
        enc = self.dialect.encode
        match cond:
            case And(()):
                return "(1 = 1)"  # {}: every row
            case And(items):
                return "(" + " AND ".join(self._cond(c, params) for c in items) + ")"
            case Or(items):
                return "(" + " OR ".join(self._cond(c, params) for c in items) + ")"
            case IsNull(name, negate):
                return f"({quote(name)} IS {'NOT ' if negate else ''}NULL)"
            case Not(item):
                # The complement, NULL rows included: NOT of an unknown is made false first.
                return f"(NOT COALESCE({self._cond(item, params)}, FALSE))"
            case Contains(name, value):
                sql, bound = self.dialect.json_contains(quote(name), value)
                params.extend(bound)
                return f"({sql})"
            case Compare(name, op, value):
                params.append(enc(self.kind(name), value))
                sql_op = "<>" if op == "!=" else op
                return f"({quote(name)} {sql_op} {p})"
            case Like(name, pattern, negate):
                params.append(self.dialect.like_pattern(pattern))
                return "(" + self.dialect.like(quote(name), negate) + ")"
            case In(name, values, negate):
                if not values:
                    return f"({quote(name)} IS NOT NULL)" if negate else "(1 = 0)"
                kind = self.kind(name)
                params.extend(self.dialect.in_params(kind, [enc(kind, v) for v in values]))
                return "(" + self.dialect.in_list(quote(name), kind, negate, len(values)) + ")"
            case Between(name, low, high, negate):
                params.extend([enc(self.kind(name), low), enc(self.kind(name), high)])
                return f"({quote(name)} {'NOT ' if negate else ''}BETWEEN {p} AND {p})"
            case Search(text, names):
                pattern = "%" + escape_like(fold_case(text)) + "%"
                parts = []
                for name in names:
                    params.append(pattern)
                    if self.kind(name) in (None, "integer"):
                        parts.append(self.dialect.contains_text(quote(name)))
                    else:
                        parts.append(self.dialect.contains_ci(quote(name)))
                return "(" + " OR ".join(parts) + ")"
        raise AssertionError(f"unknown condition {cond!r}")
