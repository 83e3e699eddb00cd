"""The query parser (params -> checked :class:`Query`) and the reference semantics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.fields import FieldType
from moleculerpy_cqrs.stores.query import (
    And,
    Between,
    Compare,
    CompareOp,
    In,
    IsNull,
    Like,
    Or,
    Query,
    Search,
    escape_like,
    like_regex,
    matches,
    parse_find,
    sort_key,
)

FIELDS: dict[str, FieldType] = {
    "name": "string",
    "note": "string",
    "qty": "integer",
    "price": "float",
    "active": "boolean",
    "data": "json",
    "at": "datetime",
}
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def where(params: dict[str, Any]) -> Any:
    return parse_find(FIELDS, params).where


def test_no_params_is_every_row() -> None:
    assert parse_find(FIELDS, {}) == Query()


def test_an_empty_query_object_is_every_row() -> None:
    assert parse_find(FIELDS, {"query": {}}) == Query()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"qty": 3}, Compare("qty", "=", 3)),
        ({"qty": None}, IsNull("qty")),
        ({"id": "7"}, Compare("id", "=", 7)),
        ({"at": "2024-01-01T00:00:00Z"}, Compare("at", "=", T0)),
        ({"price": 2}, Compare("price", "=", 2.0)),
        ({"query": {"name": "x"}}, Compare("name", "=", "x")),
    ],
)
def test_equality(params: dict[str, Any], expected: Any) -> None:
    assert where(params) == expected


@pytest.mark.parametrize(
    ("spellings", "op"),
    [
        (["=", "==", "$eq", "eq"], "="),
        (["!=", "<>", "$ne", "ne"], "!="),
        (["<", "$lt", "lt"], "<"),
        (["<=", "$lte", "lte"], "<="),
        ([">", "$gt", "gt"], ">"),
        ([">=", "$gte", "gte"], ">="),
    ],
)
def test_every_spelling_of_a_comparison(spellings: list[str], op: CompareOp) -> None:
    for spelling in spellings:
        assert where({"query": {"qty": {spelling: 2}}}) == Compare("qty", op, 2)


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ({"like": "a%"}, Like("name", "a%")),
        ({"$like": "a%"}, Like("name", "a%")),
        ({"not like": "a%"}, Like("name", "a%", negate=True)),
        ({"$nlike": "a%"}, Like("name", "a%", negate=True)),
        ({"in": ["a", "b"]}, In("name", ("a", "b"))),
        ({"$in": []}, In("name", ())),
        ({"not in": ["a"]}, In("name", ("a",), negate=True)),
        ({"$nin": ["a"]}, In("name", ("a",), negate=True)),
        ({"between": ["a", "c"]}, Between("name", "a", "c")),
        ({"$between": ["a", "c"]}, Between("name", "a", "c")),
        ({"not between": ["a", "c"]}, Between("name", "a", "c", negate=True)),
        ({"$nbetween": ["a", "c"]}, Between("name", "a", "c", negate=True)),
        ({"=": None}, IsNull("name")),
        ({"!=": None}, IsNull("name", negate=True)),
        ({"$ne": None}, IsNull("name", negate=True)),
    ],
)
def test_operator_forms(operator: dict[str, Any], expected: Any) -> None:
    assert where({"query": {"name": operator}}) == expected


def test_several_operators_on_one_field_are_anded() -> None:
    assert where({"query": {"qty": {">": 1, "<": 5}}}) == And(
        (Compare("qty", ">", 1), Compare("qty", "<", 5))
    )


def test_or_and_nest() -> None:
    query = {"or": [{"qty": 1}, {"$and": [{"name": "a"}, {"active": True}]}]}
    assert where({"query": query}) == Or(
        (
            Compare("qty", "=", 1),
            And((Compare("name", "=", "a"), Compare("active", "=", True))),
        )
    )


def test_top_level_fields_query_and_search_are_anded() -> None:
    got = where({"qty": 1, "query": {"name": "a"}, "search": "x", "searchFields": "note"})
    assert got == And((Compare("qty", "=", 1), Compare("name", "=", "a"), Search("x", ("note",))))


def test_search_defaults_to_every_string_field() -> None:
    assert where({"search": "x"}) == Search("x", ("name", "note"))
    assert where({"search": ""}) is None


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("-qty name", (("qty", True), ("name", False))),
        ("qty,-name", (("qty", False), ("name", True))),
        (["+qty", "-id"], (("qty", False), ("id", True))),
        ("", ()),
        (None, ()),
    ],
)
def test_sort(sort: Any, expected: Any) -> None:
    assert parse_find(FIELDS, {"sort": sort}).sort == expected


def test_limit_offset_and_fields() -> None:
    query = parse_find(FIELDS, {"limit": "5", "offset": 2, "fields": "name qty name"})
    assert (query.limit, query.offset, query.fields) == (5, 2, ("name", "qty"))
    assert parse_find(FIELDS, {"fields": []}).fields is None


def test_extra_params_are_left_to_the_caller() -> None:
    assert parse_find(FIELDS, {"page": 2}, extra=frozenset({"page"})) == Query()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"colour": "red"}, "unknown parameter 'colour': use query, sort"),
        ({"query": {"colour": 1}}, "unknown field 'colour'; declared fields are"),
        ({"query": {"qty": {"~": 1}}}, "unknown operator '~' for 'qty': use = != >"),
        ({"query": {"qty": {">": None}}}, "'>' cannot compare with null"),
        ({"query": {"data": {">": 1}}}, "json field 'data' takes membership"),
        ({"query": {"data": {"not in": [1]}}}, "json field 'data' takes $in, not 'not in'"),
        ({"query": {"active": {"<": True}}}, "supports only = and !="),
        ({"query": {"qty": {"like": "1%"}}}, "like needs a string field"),
        ({"query": {"name": {"like": 5}}}, "like takes a string pattern"),
        ({"query": {"qty": {"in": 5}}}, "'in' takes a list"),
        ({"query": {"qty": {"in": [{}]}}}, "a list or object is not a value here"),
        ({"query": {"qty": {"between": [1]}}}, "takes [low, high]"),
        ({"query": {"qty": {"between": [1, None]}}}, "takes [low, high]"),
        ({"query": {"active": {"between": [False, True]}}}, "cannot be compared by range"),
        ({"query": {"or": {"qty": 1}}}, "'or' takes a non-empty list"),
        ({"query": {"$and": []}}, "'$and' takes a non-empty list"),
        ({"query": {"qty": {}}}, "operators for 'qty' are empty"),
        ({"query": "qty = 1"}, "query is text that is not JSON"),
        ({"query": "[1]"}, "query must be an object (or JSON text of one)"),
        ({"query": "[" * 100_000}, "query is text that is not JSON"),
        ({"query": {"qty": "three"}}, "field 'qty' must be an integer, got str"),
        ({"query": {"qty": [1, 2]}}, "a list or object is not a value here"),
        ({"sort": "data"}, "cannot sort by json field 'data'"),
        ({"sort": 5}, "sort must be a string"),
        ({"sort": "-colour"}, "unknown field 'colour'"),
        ({"fields": 5}, "fields must be a list"),
        ({"fields": ["colour"]}, "unknown field 'colour'"),
        ({"search": 5}, "search must be a string"),
        ({"search": "x", "searchFields": ["price"]}, "searchFields must be string or integer"),
        ({"search": "x", "searchFields": []}, "must name at least one string field"),
        ({"searchFields": ["colour"]}, "unknown field 'colour'"),
        ({"limit": -1}, "limit must be a non-negative integer"),
        ({"offset": True}, "offset must be a non-negative integer"),
        ({"id": "x"}, "id must be a positive integer"),
    ],
)
def test_errors_say_what_to_write(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_find(FIELDS, params)
    assert message in str(caught.value)


def test_params_must_be_an_object() -> None:
    with pytest.raises(InvalidInput, match="params must be an object"):
        parse_find(FIELDS, ["qty"])  # type: ignore[arg-type]


def test_search_needs_a_string_field() -> None:
    with pytest.raises(InvalidInput, match="this store has no string fields"):
        parse_find({"qty": "integer"}, {"search": "x"})


def test_nesting_is_bounded() -> None:
    query: dict[str, Any] = {"qty": 1}
    for _ in range(40):
        query = {"or": [query]}
    with pytest.raises(InvalidInput, match="nests deeper than 32"):
        parse_find(FIELDS, {"query": query})


# ---------------------------------------------------------------- reference semantics


@pytest.mark.parametrize(
    "cond",
    [
        Compare("qty", "!=", 1),
        Compare("qty", "<", 100),
        In("qty", (1,), negate=True),
        Between("qty", 5, 6, negate=True),
        Like("name", "x%", negate=True),
        Search("", ("name",)),
    ],
)
def test_a_null_column_never_matches_a_comparison(cond: Any) -> None:
    assert not matches(cond, {"id": 1, "qty": None, "name": None})


def test_is_null_matches_null_only() -> None:
    assert matches(IsNull("qty"), {"qty": None})
    assert not matches(IsNull("qty"), {"qty": 0})
    assert matches(IsNull("qty", negate=True), {"qty": 0})


@pytest.mark.parametrize(
    ("pattern", "text", "hit"),
    [
        ("a%", "abc", True),
        ("a_c", "a\nc", True),
        ("A%", "abc", False),
        ("a\\%", "a%", True),
        ("a\\%", "ab", False),
        ("a\\", "a\\", True),
        ("a.c", "abc", False),
        ("(a)", "(a)", True),
    ],
)
def test_like_regex(pattern: str, text: str, hit: bool) -> None:
    assert (like_regex(pattern).fullmatch(text) is not None) is hit


def test_escape_like_makes_text_literal() -> None:
    text = "100%_\\x"
    assert like_regex(escape_like(text)).fullmatch(text)
    assert not like_regex(escape_like(text)).fullmatch("100x_\\x")


def test_search_lowercases_beyond_ascii_as_javascript_does() -> None:
    assert matches(Search("HELLO", ("name",)), {"name": "say hello"})
    assert matches(Search("é", ("name",)), {"name": "É"})
    assert matches(Search("SÃO", ("name",)), {"name": "São Paulo"})
    # lowercasing, not case folding: moleculer-db's toLowerCase leaves "ß" as it is
    assert not matches(Search("strasse", ("name",)), {"name": "Straße"})


def test_sort_key_puts_nulls_first_ascending_last_descending_and_breaks_ties_by_id() -> None:
    rows: list[dict[str, Any]] = [
        {"id": 1, "q": 2},
        {"id": 2, "q": None},
        {"id": 3, "q": 2},
        {"id": 4, "q": 1},
    ]
    ascending = sorted(rows, key=sort_key((("q", False),)))
    descending = sorted(rows, key=sort_key((("q", True),)))
    assert [r["id"] for r in ascending] == [2, 4, 1, 3]
    assert [r["id"] for r in descending] == [1, 3, 4, 2]
