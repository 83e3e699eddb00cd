"""The query language of the store actions: parsed once, checked against declared fields.

A query arrives as moleculer-db / moleculer-go/store params and leaves as a typed :class:`Query`
that every backend executes: the memory backend evaluates it with :func:`matches` (the reference
semantics), the SQL backends compile it to bound parameters. Anything not understood is an
:class:`InvalidInput` that says what to write instead; nothing is ever ignored.

Conditions (``query`` and top-level declared fields, ANDed)::

    {"country": "NZ"}                          equality (a declared field, or "id")
    {"country": None}                          IS NULL
    {"total": {">": 3, "<=": 10}}              = != <> > >= < <= (or $eq $ne $gt $gte $lt $lte)
    {"name": {"like": "Jo%"}}                  SQL LIKE, case-sensitive, "\\" escapes % and _
    {"name": {"not like": "%x"}}               also $like / $nlike
    {"id": {"in": [1, 2]}}                     also "not in", $in, $nin
    {"total": {"between": [1, 5]}}             inclusive; also "not between"
    {"country": {"!=": None}}                  IS NOT NULL
    {"or": [{...}, {...}]}                     also "and", $or, $and; nest freely ({}: every row)
    {"$not": {...}}                            the rows the query does not match, nulls too
    {"note": {"$exists": True}}                IS NOT NULL (False: IS NULL)
    {"country": {"$in": ["NZ", None]}}         a null in an in list matches NULL
    {"tags": "green"}                          a json array holding "green" (or the value)

NULL behaves as in SQL: a comparison with a NULL column is never true (only IS NULL matches);
``$not`` is the complement of what its query matches, NULL rows included, as in NeDB.
``search`` matches a substring in ``searchFields`` (default: every string field; an integer
field is searched in its decimal text), ignoring
case as moleculer-db does: both sides through Unicode lowercasing (:func:`fold_case`).
``sort`` is ``"-total country"`` or a list; ascending puts NULLs first,
descending last, and ``id`` breaks ties so paging is stable.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.fields import (
    ID,
    Fields,
    FieldType,
    check_count,
    check_id,
    check_value,
)

CompareOp = Literal["=", "!=", "<", "<=", ">", ">="]


@dataclass(frozen=True, slots=True)
class Compare:
    field: str
    op: CompareOp
    value: Any


@dataclass(frozen=True, slots=True)
class Like:
    field: str
    pattern: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class In:
    field: str
    values: tuple[Any, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Between:
    field: str
    low: Any
    high: Any
    negate: bool = False


@dataclass(frozen=True, slots=True)
class IsNull:
    field: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Contains:
    """A json field holds ``value``: it is an array with an element equal to it, or it is
    that value (moleculer-db's NeDB matches ``{tags: "green"}`` so)."""

    field: str
    value: str | int | float | bool


@dataclass(frozen=True, slots=True)
class Not:
    """The rows ``item`` does not match, rows with NULLs included (NeDB's ``$not``)."""

    item: Condition


@dataclass(frozen=True, slots=True)
class Search:
    text: str
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Condition, ...]


Condition = Compare | Like | In | Between | IsNull | Contains | Search | Not | And | Or


@dataclass(frozen=True, slots=True)
class Query:
    """A checked query. ``fields`` is a projection (None: every column, ``id`` included)."""

    where: Condition | None = None
    sort: tuple[tuple[str, bool], ...] = ()  # (field, descending)
    limit: int | None = None
    offset: int = 0
    fields: tuple[str, ...] | None = None


ALL: Final = Query()

_COMPARE: Final[dict[str, CompareOp]] = {
    "=": "=", "==": "=", "$eq": "=", "eq": "=",
    "!=": "!=", "<>": "!=", "$ne": "!=", "ne": "!=",
    "<": "<", "$lt": "<", "lt": "<",
    "<=": "<=", "$lte": "<=", "lte": "<=",
    ">": ">", "$gt": ">", "gt": ">",
    ">=": ">=", "$gte": ">=", "gte": ">=",
}  # fmt: skip
_LIKE: Final = {"like": False, "$like": False, "not like": True, "$nlike": True}
_IN: Final = {"in": False, "$in": False, "not in": True, "$nin": True}
_BETWEEN: Final = {"between": False, "$between": False, "not between": True, "$nbetween": True}
_OR: Final = frozenset({"or", "$or"})
_NOT: Final = frozenset({"not", "$not"})
_EXISTS: Final = frozenset({"exists", "$exists"})
_UNSUPPORTED: Final = {
    "$regex": "a regular expression runs differently (or not at all) on each backend and its "
    "cost has no bound; use like",
    "$size": "an array's length is not indexed by any backend; keep a count field",
    "$elemMatch": "json arrays of objects are not queried inside; declare the field you look "
    "for as a field of its own",
    "$where": "a function cannot be sent in a query",
    "$nor": "use $not with $or",
}
_AND: Final = frozenset({"and", "$and"})
_ORDERED: Final = frozenset({"string", "integer", "float", "datetime"})
_SEARCHABLE: Final = frozenset({"string", "integer"})
"""Field types ``search`` looks in: an integer by its decimal text, as moleculer-db's
MemoryAdapter (``String(v)``) and SQL's ``CAST(v AS TEXT)`` write it."""
FIND_PARAMS: Final = frozenset(
    {"query", "sort", "limit", "offset", "fields", "search", "iSearch", "searchFields"}
)
MAX_DEPTH: Final = 32
MAX_CONDITIONS: Final = 500
"""Conditions (comparisons, likes, ins, ...) in one query: SQLite refuses a deeper tree."""
MAX_IN_VALUES: Final = 100_000
"""Values in all the in lists of one query (SQLite binds at most 250,000 parameters)."""
MAX_PATTERN_BYTES: Final = 20_000
"""A LIKE pattern or search text, in UTF-8 (SQLite refuses patterns over 50,000 bytes)."""


def parse_find(
    fields: Fields, params: Mapping[str, Any], *, extra: frozenset[str] = frozenset()
) -> Query:
    """Parse the params of ``find`` (and ``count``/``list``: pass their own keys as ``extra``).

    Top-level keys that are declared fields (or ``id``) are equality filters; keys in ``extra``
    are left to the caller; any other key is an error. As moleculer-db reads them: ``limit`` 0
    is no limit, ``query`` may be JSON text (an API gateway's query string), and ``iSearch``
    is ``search`` (which ignores case already) when ``search`` is not given.
    """
    if not isinstance(params, Mapping):
        raise InvalidInput(f"params must be an object, got {type(params).__name__}")
    quick = _equalities(fields, params, extra)
    if quick is not None:
        return quick
    conditions: list[Condition] = []
    top_level: dict[str, Any] = {}
    for key, value in params.items():
        if key in FIND_PARAMS or key in extra:
            continue
        if key == ID or key in fields:
            if isinstance(value, Mapping | list):
                raise InvalidInput(
                    f"{key!r} at the top level is an equality filter and takes one value, not "
                    f"{'an object' if isinstance(value, Mapping) else 'a list'}; operators go "
                    f"under query, e.g. {{'query': {{{key!r}: {{'in': [...]}}}}}}",
                    field=str(key),
                    got=value,
                )
            top_level[key] = value
            continue
        raise InvalidInput(
            f"unknown parameter {key!r}: use query, sort, limit, offset, fields, search, "
            f"iSearch, searchFields, or a declared field {sorted(fields)}",
            field=str(key),
        )
    if top_level:
        conditions.append(parse_condition(fields, top_level))
    raw_query = _query_object(params.get("query"))
    # moleculer-db clients send ``query: {}`` for "every row".
    if raw_query is not None and not (isinstance(raw_query, Mapping) and not raw_query):
        conditions.append(parse_condition(fields, raw_query))
    search = params.get("search")
    if search is None or search == "":
        # moleculer-db's SQL adapter reads iSearch only when search is absent.
        search = params.get("iSearch")
    if search is not None and search != "":
        conditions.append(_parse_search(fields, search, params.get("searchFields")))
    elif params.get("searchFields") is not None:
        _search_fields(fields, params["searchFields"])  # still checked
    where = _and(conditions)
    _check_size(where)
    return Query(
        where=where,
        sort=parse_sort(fields, params.get("sort")),
        # moleculer-db and every adapter of it read limit 0 as "no limit".
        limit=_non_negative("limit", params.get("limit")) or None,
        offset=_non_negative("offset", params.get("offset")) or 0,
        fields=parse_projection(fields, params.get("fields")),
    )


def _query_object(raw: Any) -> Any:
    """``query`` as moleculer-db's ``sanitizeParams`` takes it: JSON text is parsed (that is how
    a query reaches a service from an API gateway's query string)."""
    if not isinstance(raw, str):
        return raw
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(
            f"query is text that is not JSON ({error}); send an object, or JSON text of one",
            field="query",
            got=raw,
        ) from None
    if not isinstance(parsed, Mapping):
        raise InvalidInput(
            f"query must be an object (or JSON text of one), got JSON {type(parsed).__name__}",
            field="query",
            got=raw,
        )
    return parsed


def _equalities(fields: Fields, params: Mapping[str, Any], extra: frozenset[str]) -> Query | None:
    """The common ``{field: value, ...}`` find (a transformation looking up its row), parsed
    without the general path's walk; None for anything else. Answers what the general path
    answers for the same params."""
    if not params or len(params) > 4:
        return None
    items: list[Condition] = []
    for key, value in params.items():
        if key in FIND_PARAMS or key in extra or key not in fields or key == ID:
            return None
        if type(value) not in _PLAIN:
            return None
        items.append(_parse_operator(key, fields[key], "=", value))
    return Query(where=_and(items))


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


def parse_condition(fields: Fields, raw: Any, depth: int = 0) -> Condition:
    """Parse a query object (the ``query`` param) into a condition."""
    cond = _parse_condition(fields, raw, depth)
    if depth == 0:
        _check_size(cond)
    return cond


def _parse_condition(fields: Fields, raw: Any, depth: int) -> Condition:
    if depth > MAX_DEPTH:
        raise InvalidInput(f"query nests deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"a query must be an object, got {type(raw).__name__}", got=raw)
    items: list[Condition] = []
    for key, value in raw.items():
        if key in _OR or key in _AND:
            if not isinstance(value, list) or not value:
                raise InvalidInput(f"{key!r} takes a non-empty list of queries", got=value)
            if len(value) > MAX_CONDITIONS:
                raise InvalidInput(
                    f"{key!r} holds {len(value)} queries; at most {MAX_CONDITIONS} "
                    "(use an in list for many values)",
                    field=str(key),
                )
            parts = tuple(_parse_condition(fields, v, depth + 1) for v in value)
            items.append(Or(parts) if key in _OR else And(parts))
            continue
        if key in _NOT:
            items.append(Not(_parse_condition(fields, value, depth + 1)))
            continue
        if isinstance(key, str) and key.startswith("$") and key not in fields:
            raise InvalidInput(
                f"{key!r} is not supported at the top of a query: "
                f"{_UNSUPPORTED.get(key, 'use $and, $or, $not or a declared field')}",
                field=key,
            )
        kind = _field_type(fields, key)
        if isinstance(value, Mapping):
            if not value:
                raise InvalidInput(f"operators for {key!r} are empty", field=key)
            items.extend(_parse_operator(key, kind, str(op), arg) for op, arg in value.items())
        else:
            items.append(_parse_operator(key, kind, "=", value))
    if not items:
        # As NeDB and MongoDB: {} matches every row ({"$or": [{}, ...]} too).
        return And(())
    cond = _and(items)
    assert cond is not None
    return cond


def parse_sort(fields: Fields, raw: Any) -> tuple[tuple[str, bool], ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        names = [s for s in re.split(r"[\s,]+", raw) if s]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        names = list(raw)
    else:
        raise InvalidInput("sort must be a string like '-total country' or a list", got=raw)
    out: dict[str, bool] = {}
    for name in names:
        descending = name.startswith("-")
        bare = name.lstrip("-+")
        kind = _field_type(fields, bare)
        if kind == "json":
            raise InvalidInput(f"cannot sort by json field {bare!r}", field=bare)
        out.setdefault(bare, descending)  # a repeated field cannot change the order
    return tuple(out.items())


def parse_projection(fields: Fields, raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        names = [s for s in re.split(r"[\s,]+", raw) if s]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        names = list(raw)
    else:
        raise InvalidInput("fields must be a list of field names or a string", got=raw)
    for name in names:
        _field_type(fields, name)
    # An empty projection means every column, as no projection does.
    return tuple(dict.fromkeys(names)) or None


def _parse_search(fields: Fields, text: Any, raw_fields: Any) -> Search:
    if not isinstance(text, str):
        raise InvalidInput("search must be a string", field="search", got=text)
    check_value("search", "string", text)
    names = _search_fields(fields, raw_fields)
    if len(escape_like(text).encode("utf-8", "surrogatepass")) > MAX_PATTERN_BYTES - 2:
        raise InvalidInput(
            f"search is too long: at most {MAX_PATTERN_BYTES - 2} bytes", field="search"
        )
    return Search(text, names)


def _search_fields(fields: Fields, raw: Any) -> tuple[str, ...]:
    if raw is None:
        names = tuple(n for n, k in fields.items() if k == "string")
        if not names:
            raise InvalidInput("search needs searchFields: this store has no string fields")
    else:
        names = parse_projection(fields, raw) or ()
        if not names:
            raise InvalidInput("searchFields must name at least one string field", got=raw)
    for name in names:
        if name != ID and fields[name] not in _SEARCHABLE:
            raise InvalidInput(
                f"searchFields must be string or integer fields; {name!r} is {fields[name]}: "
                "its text is not the same in JavaScript, Python and SQL (3.0 or 3, 1e-05 or "
                "0.00001, true or 1)",
                field=name,
            )
    return names


def _parse_operator(name: str, kind: FieldType | None, op: str, arg: Any) -> Condition:
    if op in _COMPARE:
        cop = _COMPARE[op]
        if arg is None:
            if cop not in ("=", "!="):
                raise InvalidInput(f"{name!r}: {op!r} cannot compare with null", field=name)
            return IsNull(name, negate=cop == "!=")
        if kind == "json":
            if cop == "=":
                return _contains(name, arg)
            raise InvalidInput(
                f"json field {name!r} takes membership ({{{name!r}: value}} or $in) and null "
                f"checks, not {op!r}; negate with {{'$not': {{{name!r}: value}}}}",
                field=name,
            )
        if cop not in ("=", "!=") and kind not in _ORDERED and kind is not None:
            raise InvalidInput(f"{name!r} ({kind}) supports only = and !=", field=name)
        return Compare(name, cop, _operand(name, kind, arg))
    if op in _EXISTS:
        if not isinstance(arg, bool):
            raise InvalidInput(f"{name!r}: {op!r} takes true or false", field=name, got=arg)
        # Every row has every declared field: a field exists when it holds a value.
        return IsNull(name, negate=arg)
    if op in _LIKE:
        if kind != "string":
            raise InvalidInput(f"like needs a string field; {name!r} is not", field=name)
        if not isinstance(arg, str):
            raise InvalidInput(f"{name!r}: like takes a string pattern", field=name, got=arg)
        check_value(name, "string", arg)
        if len(arg.encode()) > MAX_PATTERN_BYTES - 1:
            raise InvalidInput(
                f"{name!r}: a like pattern may be at most {MAX_PATTERN_BYTES - 1} bytes",
                field=name,
            )
        return Like(name, arg, negate=_LIKE[op])
    if op in _IN:
        return _parse_in(name, kind, op, arg)
    if op in _BETWEEN:
        if not isinstance(arg, list) or len(arg) != 2 or None in arg:
            raise InvalidInput(f"{name!r}: {op!r} takes [low, high]", field=name, got=arg)
        if kind not in _ORDERED and kind is not None:
            raise InvalidInput(f"{name!r} ({kind}) cannot be compared by range", field=name)
        low, high = (_operand(name, kind, v) for v in arg)
        return Between(name, low, high, negate=_BETWEEN[op])
    if op in _NOT:
        raise InvalidInput(
            f"{name!r}: $not takes a whole query, as in NeDB: {{'$not': {{{name!r}: {{...}}}}}}",
            field=name,
        )
    if op in _UNSUPPORTED:
        raise InvalidInput(f"{name!r}: {op} is not supported: {_UNSUPPORTED[op]}", field=name)
    raise InvalidInput(
        f"unknown operator {op!r} for {name!r}: use = != > >= < <= like 'not like' in "
        "'not in' between 'not between' exists (or their $ forms)",
        field=name,
    )


def _parse_in(name: str, kind: FieldType | None, op: str, arg: Any) -> Condition:
    """An in list; a null in it matches NULL (``$in``) or is left out (``$nin``, which never
    matches NULL anyway), as NeDB compares null with null."""
    if not isinstance(arg, list):
        raise InvalidInput(f"{name!r}: {op!r} takes a list", field=name, got=arg)
    if len(arg) > MAX_IN_VALUES:
        raise InvalidInput(
            f"{name!r}: an in list may hold at most {MAX_IN_VALUES} values", field=name
        )
    negate = _IN[op]
    with_null = None in arg
    if kind == "json":
        if negate:
            raise InvalidInput(
                f"json field {name!r} takes $in, not {op!r}; negate with "
                f"{{'$not': {{{name!r}: {{'$in': [...]}}}}}}",
                field=name,
            )
        if len(arg) > MAX_CONDITIONS:
            raise InvalidInput(
                f"{name!r}: $in on a json field takes at most {MAX_CONDITIONS} values",
                field=name,
            )
        members: list[Condition] = [_contains(name, v) for v in arg if v is not None]
        if with_null:
            members.append(IsNull(name))
        if not members:
            return In(name, ())
        return members[0] if len(members) == 1 else Or(tuple(members))
    found = In(name, tuple(_operand(name, kind, v) for v in arg if v is not None), negate)
    if not with_null or negate:
        return found
    return Or((found, IsNull(name))) if found.values else IsNull(name)


def _contains(name: str, value: Any) -> Contains:
    if isinstance(value, bool):
        return Contains(name, value)
    if isinstance(value, int):
        return Contains(name, check_value(name, "integer", value))
    if isinstance(value, float):
        return Contains(name, check_value(name, "float", value))
    if isinstance(value, str):
        return Contains(name, check_value(name, "string", value))
    raise InvalidInput(
        f"json field {name!r}: membership takes a string, number or boolean (an array or "
        "object is not compared by value)",
        field=name,
        got=value,
    )


def _operand(name: str, kind: FieldType | None, value: Any) -> Any:
    if isinstance(value, list | dict):
        raise InvalidInput(f"{name!r}: a list or object is not a value here", field=name)
    if kind is None:
        return check_id(value)
    return check_value(name, kind, value)


def _field_type(fields: Fields, name: Any) -> FieldType | None:
    """The declared type, None for ``id``; an unknown name is an error."""
    if name == ID:
        return None
    if isinstance(name, str) and name in fields:
        return fields[name]
    raise InvalidInput(
        f"unknown field {name!r}; declared fields are {sorted(fields)} and id", field=str(name)
    )


def _and(items: Sequence[Condition]) -> Condition | None:
    if not items:
        return None
    return items[0] if len(items) == 1 else And(tuple(items))


def _non_negative(name: str, value: Any) -> int | None:
    return None if value is None else check_count(name, value, minimum=0)


def _check_size(cond: Condition | None) -> None:
    """Refuse a query too big for some backend, so that every backend gives one answer."""
    conditions = values = 0
    stack = [] if cond is None else [cond]
    while stack:
        item = stack.pop()
        if isinstance(item, And | Or):
            stack.extend(item.items)
            continue
        if isinstance(item, Not):
            stack.append(item.item)
            continue
        conditions += 1
        if isinstance(item, In):
            values += len(item.values)
    if conditions > MAX_CONDITIONS:
        raise InvalidInput(
            f"the query has {conditions} conditions; at most {MAX_CONDITIONS} "
            "(use an in list for many values)"
        )
    if values > MAX_IN_VALUES:
        raise InvalidInput(
            f"the query's in lists hold {values} values; at most {MAX_IN_VALUES} "
            "(split it into several queries)"
        )


# --- reference semantics (the memory backend uses these; SQL backends must agree) ---


def matches(cond: Condition | None, record: Mapping[str, Any]) -> bool:
    """Whether ``record`` satisfies ``cond``, with SQL's NULL rules."""
    if cond is None:
        return True
    match cond:
        case And(items):
            return all(matches(c, record) for c in items)
        case Or(items):
            return any(matches(c, record) for c in items)
        case IsNull(name, negate):
            return (record.get(name) is None) != negate
        case Not(item):
            return not matches(item, record)
        case Contains(name, value):
            got = record.get(name)
            if isinstance(got, list):
                return any(json_equal(element, value) for element in got)
            return json_equal(got, value)
        case Compare(name, op, value):
            got = record.get(name)
            return got is not None and _COMPARATORS[op](got, value)
        case Like(name, pattern, negate):
            got = record.get(name)
            return got is not None and like_match(pattern, got) != negate
        case In(name, values, negate):
            got = record.get(name)
            return got is not None and (got in values) != negate
        case Between(name, low, high, negate):
            got = record.get(name)
            return got is not None and (low <= got <= high) != negate
        case Search(text, names):
            needle = fold_case(text)
            texts = (_search_text(record.get(n)) for n in names)
            return any(t is not None and needle in fold_case(t) for t in texts)
    raise AssertionError(f"unknown condition {cond!r}")


def _search_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    # An integer field (or id) by its decimal text; NULL never matches.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def json_equal(element: Any, value: str | int | float | bool) -> bool:
    """Whether a json element is ``value``, as JSON compares them (true is not 1)."""
    if isinstance(element, bool) or isinstance(value, bool):
        return element is value
    if isinstance(element, str) or isinstance(value, str):
        return isinstance(element, str) and isinstance(value, str) and element == value
    return isinstance(element, int | float) and element == value


@functools.lru_cache(maxsize=256)
def sort_key(sort: tuple[tuple[str, bool], ...]) -> Any:
    """A key for ``list.sort`` giving the documented order (NULLs first ascending; id last)."""

    class _Key:
        __slots__ = ("record",)

        def __init__(self, record: Mapping[str, Any]) -> None:
            self.record = record

        def __lt__(self, other: _Key) -> bool:
            for name, descending in (*sort, (ID, False)):
                a, b = self.record.get(name), other.record.get(name)
                if a == b:
                    continue
                less = a is None if a is None or b is None else bool(a < b)
                return less != descending
            return False

    return _Key


def like_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches the LIKE ``pattern`` (``%``, ``_``, ``\\`` escapes), in
    O(len(pattern) * len(text)) at worst: a regular expression of many ``%`` backtracks
    exponentially on a hostile pattern."""
    tokens = _like_tokens(pattern)
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        token = tokens[p] if p < len(tokens) else None
        if token is not None and token != _STAR and (token is _ONE or token == text[t]):
            p, t = p + 1, t + 1
        elif token is _STAR:
            star, mark = p, t
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(tokens) and tokens[p] is _STAR:
        p += 1
    return p == len(tokens)


_STAR: Final = object()
_ONE: Final = object()


@lru_cache(maxsize=256)
def _like_tokens(pattern: str) -> tuple[object, ...]:
    out: list[object] = []
    escaped = False
    for ch in pattern:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            if not out or out[-1] is not _STAR:
                out.append(_STAR)
        elif ch == "_":
            out.append(_ONE)
        else:
            out.append(ch)
    if escaped:
        out.append("\\")
    return tuple(out)


def like_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    escaped = False
    for ch in pattern:
        if escaped:
            out.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    if escaped:
        out.append(re.escape("\\"))
    return re.compile("".join(out), re.DOTALL)


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def fold_case(text: str) -> str:
    """How ``search`` ignores case: Unicode's full lowercase mapping, as JavaScript's
    ``toLowerCase`` in moleculer-db ("É" is "é", "İ" is "i̇", a final "Σ" is "ς"; "ß" stays
    "ß", so "strasse" does not find "Straße"). SQLite calls this very function; PostgreSQL
    lowercases under ICU's root locale, which maps the same."""
    return text.lower()


def escape_like(text: str) -> str:
    """Escape ``\\``, ``%`` and ``_`` so ``text`` matches literally in a LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_COMPARATORS: Final = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}

__all__ = [
    "ALL", "And", "Between", "Compare", "Condition", "Contains", "In", "IsNull", "Like", "Not",
    "Or", "Query",
    "Search", "ascii_lower", "escape_like", "fold_case", "like_match", "like_regex", "matches",
    "parse_condition", "parse_find", "parse_projection", "parse_sort", "sort_key",
]  # fmt: skip
