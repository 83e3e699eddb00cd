"""The SQL compiler: values only ever travel as parameters; identifiers are checked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from moleculerpy_cqrs.stores.backends.sqlite import _DIALECT as SQLITE
from moleculerpy_cqrs.stores.fields import FieldType
from moleculerpy_cqrs.stores.query import (
    And,
    Between,
    Compare,
    Condition,
    In,
    IsNull,
    Like,
    Or,
    Query,
    Search,
    parse_find,
)
from moleculerpy_cqrs.stores.sql import Compiler, Dialect, quote
from moleculerpy_cqrs.testing.conformance import HOSTILE_NAMES, HOSTILE_VALUES

FIELDS: dict[str, FieldType] = {
    "name": "string",
    "qty": "integer",
    "price": "float",
    "active": "boolean",
    "data": "json",
    "at": "datetime",
}
SENTINEL = "s3ntinel"


class Pyformat(Dialect):
    """A server-style dialect (``%s`` placeholders, LIKE with ESCAPE)."""

    placeholder = "%s"

    def encode(self, kind: FieldType | None, value: Any) -> Any:
        return value

    def like(self, column: str, negate: bool) -> str:
        return f"{column} {'NOT ' if negate else ''}LIKE %s ESCAPE '\\'"


DIALECTS = [pytest.param(SQLITE, id="sqlite"), pytest.param(Pyformat(), id="pyformat")]


def hostile(value: str) -> str:
    return f"{SENTINEL}{value}"


CONDITIONS: list[Condition] = [
    Compare("name", "=", hostile("'); DROP TABLE t; --")),
    Compare("qty", ">", 987_654_321),
    Compare("price", "<=", 1234.5678),
    Compare("active", "!=", True),
    Compare("at", "<", datetime(2031, 7, 9, tzinfo=UTC)),
    Compare("id", "=", 424_242),
    Like("name", hostile("%\\_x"), negate=True),
    In("name", (hostile("a"), hostile("' OR 1=1"))),
    In("qty", (), negate=True),
    Between("qty", 111_111, 222_222, negate=True),
    IsNull("data"),
    Search(hostile("Hello%_"), ("name",)),
    Or((And((Compare("name", "=", hostile("x")), IsNull("qty", True))), Compare("qty", "=", 5))),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("cond", CONDITIONS)
def test_values_never_appear_in_the_sql(dialect: Dialect, cond: Condition) -> None:
    compiler = Compiler("t", FIELDS, dialect)
    query = Query(where=cond, sort=(("qty", True),), limit=313_131, offset=717_171)
    statements = [
        compiler.select(query),
        compiler.count(query),
        compiler.delete(query),
        compiler.update(query, {"name": hostile("new"), "qty": 555_555}),
    ]
    for sql, params in statements:
        for needle in (SENTINEL.lower(), "987654321", "1234.5678", "2031", "424242", "111111"):
            assert needle not in sql.lower()
        for needle in ("313131", "717171", "555555", "drop", "' or"):
            assert needle not in sql.lower()
        assert sql.count(dialect.placeholder) == len(params)


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_values_from_params_stay_parameters(value: str) -> None:
    compiler = Compiler("t", FIELDS, SQLITE)
    query = parse_find(FIELDS, {"name": value, "query": {"name": {"like": value}}})
    sql, params = compiler.select(query)
    assert sql == (
        'SELECT "id", "name", "qty", "price", "active", "data", "at" FROM "t" '
        'WHERE (("name" = ?) AND ("name" GLOB ?)) ORDER BY "id" ASC NULLS FIRST'
    )
    assert params[0] == value


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "a\x00b", "naïve"])
def test_quote_refuses_anything_but_an_identifier(name: str) -> None:
    with pytest.raises(ValueError, match="not an identifier"):
        quote(name)


def test_quote_double_quotes_an_identifier() -> None:
    assert quote("total_2") == '"total_2"'


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_compiler_refuses_hostile_names(name: str) -> None:
    with pytest.raises(ValueError, match="not an identifier"):
        Compiler(name, FIELDS, SQLITE)
    compiler = Compiler("t", FIELDS, SQLITE)
    for build in (
        lambda: compiler.select(Query(fields=(name,))),
        lambda: compiler.select(Query(sort=((name, False),))),
        lambda: compiler.update(Query(), {name: 1}),
        lambda: compiler.insert([name]),
        lambda: compiler.select(Query(where=IsNull(name))),
    ):
        with pytest.raises(ValueError, match="not an identifier"):
            build()


@pytest.mark.parametrize(
    ("dialect", "tail", "params"),
    [
        (SQLITE, " LIMIT ? OFFSET ?", [5, 10]),
        (Pyformat(), " LIMIT %s OFFSET %s", [5, 10]),
    ],
)
def test_limit_and_offset_are_parameters(dialect: Dialect, tail: str, params: list[int]) -> None:
    sql, got = Compiler("t", FIELDS, dialect).select(Query(limit=5, offset=10))
    assert sql.endswith(tail)
    assert got == params


@pytest.mark.parametrize(("dialect", "limit"), [(SQLITE, "LIMIT -1"), (Pyformat(), "LIMIT ALL")])
def test_an_offset_without_a_limit(dialect: Dialect, limit: str) -> None:
    sql, params = Compiler("t", FIELDS, dialect).select(Query(offset=3))
    assert f" {limit} OFFSET " in sql
    assert params == [3]


def test_sort_ends_with_the_id_tie_break() -> None:
    sql, _ = Compiler("t", FIELDS, SQLITE).select(Query(sort=(("qty", True), ("name", False))))
    assert sql.endswith(
        'ORDER BY "qty" DESC NULLS LAST, "name" ASC NULLS FIRST, "id" ASC NULLS FIRST'
    )


def test_an_empty_in_list() -> None:
    compiler = Compiler("t", FIELDS, SQLITE)
    assert compiler.where(In("qty", ()))[0] == " WHERE (1 = 0)"
    assert compiler.where(In("qty", (), negate=True))[0] == ' WHERE ("qty" IS NOT NULL)'


def test_search_binds_a_lowercased_escaped_pattern() -> None:
    sql, params = Compiler("t", FIELDS, SQLITE).where(Search("50% ÉTÉ_\\", ("name",)))
    assert sql == " WHERE (cqrs_fold_case(\"name\") LIKE ? ESCAPE '\\')"
    assert params == ["%50\\% été\\_\\\\%"]


@pytest.mark.parametrize(
    ("pattern", "bound"), [("a%", "a%"), ("a\\", "a\\\\"), ("a\\\\", "a\\\\"), ("\\\\\\", "\\" * 4)]
)
def test_a_trailing_lone_backslash_is_bound_as_a_literal(pattern: str, bound: str) -> None:
    _, params = Compiler("t", FIELDS, Pyformat()).where(Like("name", pattern))
    assert params == [bound]


def test_sqlite_binds_like_as_a_glob() -> None:
    sql, params = Compiler("t", FIELDS, SQLITE).where(Like("name", "a*%_", negate=True))
    assert sql == ' WHERE ("name" NOT GLOB ?)'
    assert params == ["a[*]*?"]


def test_sqlite_encodes_values() -> None:
    compiler = Compiler("t", FIELDS, SQLITE)
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    _, params = compiler.update(Query(), {"active": True, "data": {"ü": [1]}, "at": at})
    assert params == [1, '{"ü":[1]}', "2024-01-02T03:04:05.000000+00:00"]


def test_an_insert_without_fields_uses_default_values() -> None:
    assert Compiler("t", {}, SQLITE).insert([]) == 'INSERT INTO "t" DEFAULT VALUES'
