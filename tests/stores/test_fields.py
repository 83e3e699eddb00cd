"""Field checks: the fast paths for common values keep the full checks' answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.fields import check_json, check_record, declare_fields


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
