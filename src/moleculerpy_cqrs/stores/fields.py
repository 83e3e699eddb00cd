"""Declared field types, and how values of each are checked and normalised.

Every store table has an integer primary key ``id`` that the store assigns; the declared fields
are the other columns. Values are read back as the type they were written: an integer as int, a
float as float, a boolean as bool, json as dict/list/scalar, a datetime as an aware
``datetime`` (UTC when written naive).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from moleculerpy_cqrs.errors import ConfigurationError, InvalidInput
from moleculerpy_cqrs.stores.encoding import encode_json

FieldType = Literal["string", "integer", "float", "boolean", "json", "datetime"]
FIELD_TYPES: Final[frozenset[str]] = frozenset(get_args(FieldType))
ID: Final = "id"

Record = dict[str, Any]
Fields = Mapping[str, FieldType]

# Type names accepted from users (the Go library's column types included) and what they mean.
_ALIASES: Final[dict[str, FieldType]] = {
    "string": "string",
    "str": "string",
    "text": "string",
    "integer": "integer",
    "int": "integer",
    "float": "float",
    "number": "float",
    "real": "float",
    "boolean": "boolean",
    "bool": "boolean",
    "json": "json",
    "object": "json",
    "array": "json",
    "map": "json",
    "datetime": "datetime",
    "timestamp": "datetime",
}

MAX_INT: Final = 2**63 - 1
"""The largest integer every backend stores (SQLite INTEGER, PostgreSQL BIGINT)."""
_MAX_INT: Final = MAX_INT
_MAX_JSON_DEPTH: Final = 200
_MAX_FLOAT_INT: Final = int(sys.float_info.max)
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_ASCII_DIGITS: Final = re.compile("[0-9]+")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One declared field: its type, and whether lookups by it go through an index.

    ``unique`` implies ``index``: the store then refuses a second row with the same non-null
    value (a :class:`~moleculerpy_cqrs.errors.ConflictError`, code 409).
    """

    type: FieldType
    index: bool = False
    unique: bool = False

    def public(self) -> str | dict[str, Any]:
        """The declaration as a user writes it: the type name, or a spec with its flags."""
        if self.unique:
            return {"type": self.type, "unique": True}
        if self.index:
            return {"type": self.type, "index": True}
        return self.type


FieldDeclaration = str | Mapping[str, Any] | FieldSpec
"""A field as declared: a type name (``"string"``), or a spec such as ``{"type": "string",
"index": True}`` or ``{"type": "string", "unique": True}``."""

Declarations = Mapping[str, FieldDeclaration]
"""Fields as declared: ``{name: type name or spec}``."""

_SPEC_KEYS: Final = frozenset({"type", "index", "unique"})


def declare_specs(*declarations: Mapping[str, FieldDeclaration] | None) -> dict[str, FieldSpec]:
    """Merge field declarations (later ones win) into checked ``{name: FieldSpec}``.

    Names must be identifiers (letters, digits, underscore; not starting with a digit), so they
    can be quoted safely as SQL identifiers; ``id`` is implicit and may not be declared.
    """
    out: dict[str, FieldSpec] = {}
    for decl in declarations:
        for name, declared in (decl or {}).items():
            if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
                raise ConfigurationError(
                    f"field name {name!r} is not allowed: use letters, digits and underscores"
                )
            if name == ID:
                raise ConfigurationError("field 'id' is implicit (the store assigns it)")
            out[name] = _spec(name, declared)
    return out


def _spec(name: str, declared: Any) -> FieldSpec:
    if isinstance(declared, FieldSpec):
        return declared
    if isinstance(declared, Mapping):
        unknown = sorted(str(k) for k in declared if k not in _SPEC_KEYS)
        if unknown:
            raise ConfigurationError(
                f"field {name!r} has unknown key {unknown[0]!r}; a field spec takes "
                f"{sorted(_SPEC_KEYS)}, e.g. {{'type': 'string', 'index': True}}"
            )
        flags = {}
        for flag in ("index", "unique"):
            value = declared.get(flag, False)
            if not isinstance(value, bool):
                raise ConfigurationError(f"field {name!r}: {flag!r} must be True or False")
            flags[flag] = value
        if "type" not in declared:
            raise ConfigurationError(f"field {name!r} has no 'type'")
        kind = _canonical(name, declared["type"])
        if kind == "json" and (flags["index"] or flags["unique"]):
            raise ConfigurationError(
                f"field {name!r} is json, which cannot be indexed: index a string or number "
                "field that holds the key instead"
            )
        return FieldSpec(kind, flags["index"] or flags["unique"], flags["unique"])
    return FieldSpec(_canonical(name, declared))


def _canonical(name: str, kind: Any) -> FieldType:
    canonical = _ALIASES.get(str(kind).lower())
    if canonical is None:
        raise ConfigurationError(
            f"field {name!r} has unknown type {kind!r}; use one of {sorted(FIELD_TYPES)}"
        )
    return canonical


def declare_fields(*declarations: Mapping[str, FieldDeclaration] | None) -> dict[str, FieldType]:
    """Merge field declarations (see :func:`declare_specs`) into a checked ``{name: type}``."""
    return {name: spec.type for name, spec in declare_specs(*declarations).items()}


def check_value(field: str, kind: FieldType, value: Any) -> Any:
    """Check one value against its field type and answer it normalised; ``None`` is allowed.

    Raises :class:`InvalidInput` naming the field and what was expected.
    """
    if value is None:
        return None
    if kind == "string" and type(value) is str and value.isascii() and "\x00" not in value:
        return value  # the common case, first
    match kind:
        case "string":
            if isinstance(value, str):
                return _check_text(field, value)
        case "integer":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                if -_MAX_INT - 1 <= value <= _MAX_INT:
                    return value
                raise InvalidInput(f"field {field!r} is out of the 64-bit range", field=field)
        case "float":
            if isinstance(value, int) and not isinstance(value, bool):
                if abs(value) <= _MAX_FLOAT_INT:
                    return float(value)
                raise InvalidInput(f"field {field!r} is beyond the float range", field=field)
            if isinstance(value, float):
                if math.isfinite(value):
                    return value
                raise InvalidInput(f"field {field!r} must be a finite number", field=field)
        case "boolean":
            if isinstance(value, bool):
                return value
        case "json":
            return check_json(field, value)
        case "datetime":
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    pass
            if isinstance(value, datetime):
                try:
                    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
                except OverflowError:
                    raise InvalidInput(
                        f"field {field!r} is outside the datetime range in UTC", field=field
                    ) from None
    raise InvalidInput(
        f"field {field!r} must be {_DESCRIBE[kind]}, got {type(value).__name__}",
        field=field,
        got=value,
    )


def check_json(field: str, value: Any) -> Any:
    """Check a JSON value: objects with string keys, arrays (lists), strings, finite numbers,
    booleans and (inside containers) null. Anything a JSON round trip would change is refused,
    so every backend reads back exactly what was written."""
    _check_json(field, value, 0)
    return value


def _check_json(field: str, value: Any, depth: int) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise InvalidInput(
            f"field {field!r} nests too deeply (more than {_MAX_JSON_DEPTH} levels)", field=field
        )
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(field, value)
    elif isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"field {field!r} must hold finite numbers only", field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not _plain_text(key):
                if not isinstance(key, str):
                    raise InvalidInput(
                        f"field {field!r}: JSON object keys must be strings, got {key!r}",
                        field=field,
                    )
                _check_text(field, key)
            if depth == _MAX_JSON_DEPTH or not _plain_leaf(item):
                _check_json(field, item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if depth == _MAX_JSON_DEPTH or not _plain_leaf(item):
                _check_json(field, item, depth + 1)
    else:
        raise InvalidInput(
            f"field {field!r} must be {_DESCRIBE['json']}, got {type(value).__name__} inside",
            field=field,
            got=value,
        )


def _plain_text(value: Any) -> bool:
    """A str that needs no closer look (the common case, answered without a call deeper)."""
    return type(value) is str and value.isascii() and "\x00" not in value


def _plain_leaf(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is bool or value is None or _plain_text(value)


def _check_text(field: str, value: str) -> str:
    # NUL and lone surrogates cannot be stored as UTF-8 text by every backend.
    if "\x00" in value:
        raise InvalidInput(f"field {field!r} may not hold a NUL character", field=field)
    if not value.isascii() and (found := _SURROGATE.search(value)):
        raise InvalidInput(
            f"field {field!r} holds a lone surrogate (U+{ord(found.group()[0]):04X}), which is "
            "not text: send the character itself or a complete surrogate pair",
            field=field,
        )
    return value


def check_meta(key: Any, value: Any) -> str | None:
    """Check a meta entry; answers the value as compact JSON text (None: delete the key)."""
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"a meta key must be a non-empty string, got {key!r}", got=key)
    _check_text("meta key", key)
    if value is None:
        return None
    check_json(f"meta {key}", value)
    return encode_json(value)


def check_id(value: Any) -> int:
    """An id as given by a caller (int, or a string of digits as the Go examples send)."""
    number = parse_int(value)
    if number is not None and 0 < number <= _MAX_INT:
        return number
    raise InvalidInput(
        f"id must be a positive integer up to {_MAX_INT} (a number, or a string of ASCII "
        f"digits), got {_short(value)!r}",
        field=ID,
        got=value,
    )


def parse_int(value: Any) -> int | None:
    """An int, or a string of ASCII digits (at most 19), as an int; None for anything else.

    ``str.isdigit`` and ``int()`` also take other scripts' digits ("٣", "²"): only ASCII
    digits count, as in every other Moleculer implementation.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= 19 and _ASCII_DIGITS.fullmatch(value):
        return int(value)
    return None


def check_count(name: str, value: Any, *, minimum: int, maximum: int = _MAX_INT) -> int:
    """A limit, offset, page or size: an int (or a string of ASCII digits) in range."""
    number = parse_int(value)
    if number is not None and minimum <= number <= maximum:
        return number
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, "an integer")
    raise InvalidInput(
        f"{name} must be {kind} from {minimum} to {maximum} (ASCII digits), got {_short(value)!r}",
        field=name,
        got=value,
    )


def _short(value: Any, limit: int = 60) -> Any:
    try:
        text = repr(value)
    except RecursionError:
        return "(nested too deeply to show)"
    return value if len(text) <= limit else text[:limit] + "..."


def check_record(fields: Fields, record: Mapping[str, Any], *, partial: bool = False) -> Record:
    """Check a record to write: every key a declared field, every value of its type.

    With ``partial`` (an update) only the given keys are checked; otherwise missing declared
    fields are stored as ``None``. ``id`` is never accepted here.
    """
    if type(record) is not dict and not isinstance(record, Mapping):
        raise InvalidInput(f"a record must be an object, got {type(record).__name__}")
    unknown = [k for k in record if k not in fields]
    if unknown:
        raise InvalidInput(
            f"unknown field {unknown[0]!r}; declared fields are {sorted(fields)}",
            field=str(unknown[0]),
        )
    out = {
        k: v if _settled(fields[k], v) else check_value(k, fields[k], v) for k, v in record.items()
    }
    if not partial:
        for name in fields:
            out.setdefault(name, None)
    return out


def _settled(kind: FieldType, value: Any) -> bool:
    """Whether ``value`` is already a valid, normalised ``kind`` (checked without a call to
    :func:`check_value`: the common cases of a record, fast)."""
    if value is None:
        return True
    if kind == "string":
        return _plain_text(value)
    return kind == "integer" and type(value) is int and -_MAX_INT - 1 <= value <= _MAX_INT


_DESCRIBE: Final[dict[FieldType, str]] = {
    "string": "a string",
    "integer": "an integer",
    "float": "a number",
    "boolean": "true or false",
    "json": "JSON (object, array or scalar)",
    "datetime": "an ISO-8601 datetime",
}
