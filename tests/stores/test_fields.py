"""Field checks: the fast paths for common values keep the full checks' answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from moleculerpy_cqrs.errors import ConfigurationError, InvalidInput
from moleculerpy_cqrs.stores.fields import (
    FieldSpec,
    check_json,
    check_record,
    declare_fields,
    declare_specs,
)


@pytest.mark.parametrize("wrap", [lambda v: [v], lambda v: {"k": v}], ids=["list", "dict"])
@pytest.mark.parametrize("leaf", [1, "text", None, True, 2.5])
def test_json_nests_200_levels_deep_and_no_deeper(wrap: Callable[[Any], Any], leaf: Any) -> None:
    def nested(levels: int) -> Any:
        value = leaf
        for _ in range(levels):
            value = wrap(value)
        return value

    check_json("f", nested(200))
    with pytest.raises(InvalidInput, match=r"nests too deeply \(more than 200 levels\)"):
        check_json("f", nested(201))


@pytest.mark.parametrize(
    ("fields", "record", "says"),
    [
        ({"n": "integer"}, {"n": True}, "must be an integer"),
        ({"n": "integer"}, {"n": 2**63}, "64-bit"),
        ({"s": "string"}, {"s": "a\x00b"}, "NUL"),
        ({"s": "string"}, {"s": "é\ud800"}, "surrogate"),
        ({"j": "json"}, {"j": {"k": "a\x00"}}, "NUL"),
        ({"j": "json"}, {"j": {1: "x"}}, "keys must be strings"),
        ({"j": "json"}, {"j": ["ok", float("inf")]}, "finite"),
        ({"j": "json"}, {"j": {"k": ("t",)}}, "tuple"),
    ],
)
def test_common_values_fast_and_bad_values_refused(
    fields: dict[str, Any], record: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInput, match=says):
        check_record(declare_fields(fields), record)


def test_plain_values_pass_unchanged() -> None:
    fields = declare_fields({"s": "string", "n": "integer", "f": "float", "j": "json"})
    record = {"s": "plain", "n": -(2**63), "f": 1, "j": {"a": ["é", 1, None, True, 2.5]}}
    assert check_record(fields, record) == {**record, "f": 1.0}


def test_a_field_may_be_declared_as_a_spec_with_index_flags() -> None:
    specs = declare_specs(
        {
            "plain": "str",
            "owner": {"type": "string", "index": True},
            "account": {"type": "text", "unique": True},
            "n": {"type": "int"},
        }
    )
    assert specs == {
        "plain": FieldSpec("string"),
        "owner": FieldSpec("string", index=True),
        "account": FieldSpec("string", index=True, unique=True),  # unique implies an index
        "n": FieldSpec("integer"),
    }
    assert declare_fields(specs) == {
        "plain": "string",
        "owner": "string",
        "account": "string",
        "n": "integer",
    }
    assert declare_specs(specs) == specs  # specs pass through a second declaration


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        ({"type": "string", "indexed": True}, "unknown key 'indexed'"),
        ({"index": True}, "has no 'type'"),
        ({"type": "strong", "index": True}, "unknown type 'strong'"),
        ({"type": "string", "unique": "yes"}, "'unique' must be True or False"),
        ({"type": "json", "index": True}, "json, which cannot be indexed"),
    ],
)
def test_a_bad_field_spec_is_refused(declared: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        declare_specs({"f": declared})
