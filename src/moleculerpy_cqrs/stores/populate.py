"""moleculer-db's ``populate``: related rows fetched from other services by the ids in a field.

Rules are declared as moleculer-db's ``settings.populates`` declares them::

    {"author": "users.get"}                                  the field holds a users id
    {"author": {"action": "users.get", "params": {"fields": "name"}}}
    {"writer": {"field": "author", "action": "users.get"}}  the row gets writer; author stays
    {"author": {"action": "users.get", "populate": ["company"]}}   populate on, over there

A read asks for them with ``populate: ["author"]`` (or ``"author writer"``; ``"author.company"``
asks users.get to populate its ``company``). As moleculer-db does, the ids of every row are
collected (nulls, 0 and "" left out), the rule's action is called once with ``{id: [...],
mapping: true, populate: [...], **params}``, and each row's field is replaced by the row the
answer maps its id to (a list of ids gives a list, missing ones left out). This happens before
``fields`` and ``excludeFields`` shape the rows, so they may name a rule's key.

Where this differs: an id that is null or not found gives null here (moleculer-db leaves the
field out of the row), and a ``populate`` naming no rule is a 422 (moleculer-db ignores it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as default
from typing import Any

from moleculerpy_cqrs.errors import ConfigurationError, InvalidInput, StoreError
from moleculerpy_cqrs.stores.fields import ID, Record

Caller = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""Calls an action with params (the broker layer gives the calling context's ``ctx.call``)."""


@dataclass(frozen=True, slots=True)
class PopulateRule:
    key: str  # the row's key the related row(s) go into
    field: str  # the declared field (or id) holding the id or ids
    action: str
    params: Mapping[str, Any] = default(default_factory=dict)
    populate: tuple[str, ...] = ()


def declare_populates(
    raw: Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> dict[str, PopulateRule]:
    """Check moleculer-db's ``populates`` setting against the declared ``fields``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError("populates is an object: {key: action name or rule}")
    rules: dict[str, PopulateRule] = {}
    for key, rule in raw.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigurationError(
                f"populates key {key!r} must be a plain name (nested keys are not supported)"
            )
        if isinstance(rule, str):
            rule = {"action": rule}
        if callable(rule) or not isinstance(rule, Mapping):
            raise ConfigurationError(
                f"populates[{key!r}] must be an action name or {{action, params, field, "
                "populate}} (a function rule is not supported: name an action)"
            )
        unknown = set(rule) - {"action", "params", "field", "populate"}
        if unknown:
            raise ConfigurationError(
                f"populates[{key!r}] takes action, params, field and populate, not "
                f"{sorted(unknown)}"
            )
        action = rule.get("action")
        if not isinstance(action, str) or not action:
            raise ConfigurationError(f"populates[{key!r}] needs an action name")
        source = rule.get("field", key)
        if source != ID and source not in fields:
            raise ConfigurationError(
                f"populates[{key!r}] reads the ids from {source!r}, which is not a declared "
                f"field (declared: {sorted(fields)}); give the rule a field"
            )
        params = rule.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigurationError(f"populates[{key!r}].params must be an object")
        nested = rule.get("populate") or []
        if isinstance(nested, str):
            nested = _names(nested)
        if not isinstance(nested, list) or not all(isinstance(n, str) for n in nested):
            raise ConfigurationError(f"populates[{key!r}].populate must be a list of names")
        rules[key] = PopulateRule(key, source, action, dict(params), tuple(nested))
    return rules


@dataclass(frozen=True, slots=True)
class Populator:
    """The declared rules, and how to call the services that hold the related rows."""

    rules: Mapping[str, PopulateRule]
    call: Caller

    def requested(self, raw: Any) -> dict[str, list[str]]:
        """The ``populate`` param as rule key -> what to ask that rule's service to populate."""
        return requested(self.rules, raw)

    async def populate(self, rows: list[Record], wanted: Mapping[str, list[str]]) -> None:
        """Set each wanted rule's key in ``rows`` (in place) to the related row(s). Every
        rule reads the ids as the rows hold them before any is replaced (two rules may read
        one field, as ``author`` and ``writer`` do)."""
        rules = [self.rules[k] for k in wanted]
        held = [[row.get(rule.field) for row in rows] for rule in rules]
        found = await asyncio.gather(
            *(
                self._fetch(rule, wanted[rule.key], ids)
                for rule, ids in zip(rules, held, strict=True)
            )
        )
        for rule, ids, related in zip(rules, held, found, strict=True):
            if related is None:
                continue  # as moleculer-db: no id asked, the rows keep what they hold
            for row, value in zip(rows, ids, strict=True):
                if isinstance(value, list):
                    got = (related.get(js_key(v)) for v in _flat(value))
                    row[rule.key] = [r for r in got if r]
                else:
                    row[rule.key] = None if value is None else related.get(js_key(value))

    async def _fetch(
        self, rule: PopulateRule, deeper: list[str], held: list[Any]
    ) -> Mapping[str, Any] | None:
        ids: dict[str, Any] = {}
        for value in _flat(held):
            if value is not None and value is not False and value != 0 and value != "":
                ids.setdefault(js_key(value), value)
        if not ids:
            return None
        params: dict[str, Any] = {"id": list(ids.values()), "mapping": True}
        nested = [*deeper, *rule.populate]
        if nested:
            params["populate"] = nested
        params.update(rule.params)
        found = await self.call(rule.action, params)
        if not isinstance(found, Mapping):
            raise StoreError(
                f"populate {rule.key!r}: {rule.action} answered {type(found).__name__}, not an "
                "object keyed by id (it is called with mapping: true)"
            )
        return found


def requested(rules: Mapping[str, PopulateRule], raw: Any) -> dict[str, list[str]]:
    if raw is None or raw == "" or raw == []:
        return {}
    names = _names(raw) if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidInput(
            "populate must be a string or a list of strings", field="populate", got=raw
        )
    out: dict[str, list[str]] = {}
    for name in names:
        rule = next((k for k in rules if name == k or name.startswith(k + ".")), None)
        if rule is None:
            declared = sorted(rules)
            raise InvalidInput(
                f"populate {name!r} names no populate rule; "
                + (
                    f"the declared ones are {declared}"
                    if declared
                    else "this store declares none (Aggregate(..., populates={...}), as "
                    "moleculer-db's settings.populates)"
                ),
                field="populate",
                got=raw,
            )
        deeper = out.setdefault(rule, [])
        if name != rule:
            deeper.append(name[len(rule) + 1 :])
    return out


def js_key(value: Any) -> str:
    """``value`` as a JavaScript object key (``String(value)``): how a mapping answer is keyed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def _names(text: str) -> list[str]:
    return [n for n in re.split(r"[,\s]+", text) if n]


def _flat(value: Any) -> Sequence[Any]:
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for item in value:
        out.extend(_flat(item))
    return out


__all__ = ["Caller", "PopulateRule", "Populator", "declare_populates", "js_key", "requested"]
