"""The one seam where stored JSON is made and read: every backend, the meta of every table
and the backup files encode with :func:`encode_json` and decode with :func:`decode_json`, so
a value reads back the same whichever backend wrote it."""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final

# Checked values are JSON that reads back as written (fields.check_json), nested no deeper
# than its limit: no circularity check is needed. The C encoder made once, rather than per
# call as json.dumps and JSONEncoder.encode do, halves the cost of a small document.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_MAKE_C_JSON: Callable[..., Callable[[Any, int], Sequence[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_C_JSON: Final = (
    None
    if _MAKE_C_JSON is None
    # markers, default, encoder, indent, separators, sort_keys, skipkeys, allow_nan
    else _MAKE_C_JSON(None, None, json.encoder.encode_basestring, None, ":", ",", *[False] * 3)
)

decode_json: Final[Callable[[str | bytes], Any]] = json.loads
"""Stored JSON text (a json field, a meta value, a backup line) as the value it encodes."""


def decode_json_many(texts: list[str]) -> list[Any]:
    """Many stored JSON texts at once, as :func:`decode_json` reads each: one parse of the
    texts joined into an array (a third of the cost of a parse each, for small documents).
    The texts are ones :func:`encode_json` wrote; should the joined array not parse into one
    value per text, each is parsed on its own (so a bad text raises as it would alone)."""
    if len(texts) < 2:
        return [decode_json(t) for t in texts]
    try:
        values = decode_json("[" + ",".join(texts) + "]")
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != len(texts):
        return [decode_json(t) for t in texts]
    return values


def encode_json(value: Any) -> str:
    """A checked JSON value as the compact text every backend stores (UTF-8 kept as is, no
    spaces): the same text ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``
    gives, made faster."""
    if type(value) is dict and not value:  # an event's usual meta
        return "{}"
    if _C_JSON is None:
        return _JSON.encode(value)
    return "".join(_C_JSON(value, 0))


def plain_value(kind: str, value: Any) -> Any:
    """A checked value of a field of type ``kind`` as plain JSON (a datetime as ISO text);
    :func:`~moleculerpy_cqrs.stores.fields.check_value` reads it back."""
    return value.isoformat() if kind == "datetime" and isinstance(value, datetime) else value
