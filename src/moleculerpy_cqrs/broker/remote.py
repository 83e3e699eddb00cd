"""Many transformation calls in one request to another node (see ``core/remote.py``).

The projector's node sends ``$cqrs.callMany`` to a node that serves a transformation; that
node calls the action locally once per call and answers every answer or error, in order. The
action is not a registered service's: every broker that :func:`~.compat.install` was applied
to serves it in its request handler, and says so in its node's INFO metadata
(``cqrsCallMany``), which is how a projector knows it may send many calls at once; to a node
without it (a Moleculer.js node, a plain MoleculerPy broker) it calls once per event.

While a call runs on the serving node, a read it makes of the projector's aggregate is
answered there from the rows the call carries, when the read asks for no more than them
(equality on the binding's key field); in a serial request, such a read by any call but the
first stops the request there (its answer would miss the effects of the calls before it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from moleculerpy.errors import ServiceNotFoundError

from moleculerpy_cqrs.core.joins import AGGREGATE_KEY, ITEM_KEY
from moleculerpy_cqrs.core.port import KeyRows, ManyAnswers, ManyCall, Outcome
from moleculerpy_cqrs.errors import Conflict, InvalidInput
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.fields import Record
from moleculerpy_cqrs.stores.query import ALL, And, Compare, Condition, In, Query, matches, sort_key

if TYPE_CHECKING:
    from moleculerpy.broker import ServiceBroker
    from moleculerpy.context import Context

CALL_MANY: Final = "$cqrs.callMany"
CAPABILITY: Final = "cqrsCallMany"  # in a node's INFO metadata: it serves CALL_MANY
AT_ONCE: Final = 64  # calls of one non-serial request running at once on the serving node

ErrorPayload = Callable[[Exception], dict[str, Any]]
RebuildError = Callable[[Any, str | None], Exception]


def serves_many(broker: ServiceBroker, node_id: str) -> bool:
    """Whether ``node_id`` serves :data:`CALL_MANY` (its INFO said so)."""
    node = broker.node_catalog.nodes.get(node_id)
    metadata = getattr(node, "metadata", None)
    return isinstance(metadata, Mapping) and bool(metadata.get(CAPABILITY))


def request_params(
    calls: Sequence[ManyCall], *, serial: bool, fields: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "serial": serial,
        "fields": fields,
        "calls": [
            {
                "action": c.action,
                "params": c.params,
                "meta": c.meta,
                "rows": None
                if c.rows is None
                else {"field": c.rows.field, "value": c.rows.value, "rows": c.rows.rows},
            }
            for c in calls
        ],
    }


def answers_of(answer: Any, node: str, rebuild: RebuildError) -> ManyAnswers:
    got = answer.get("answers") if isinstance(answer, dict) else None
    if not isinstance(got, list):
        raise InvalidInput(f"{node} answered {CALL_MANY} with no list of answers")
    outcomes: list[Outcome] = [
        (True, a.get("data"))
        if isinstance(a, dict) and a.get("ok")
        else (False, rebuild(a.get("error") if isinstance(a, dict) else None, node))
        for a in got
    ]
    return ManyAnswers(outcomes)


# ---------------------------------------------------------------------- the serving node


@dataclass
class _Request:
    serial: bool
    fields: dict[str, Any] | None
    stop: int | None = None  # serial: the call that read too early


@dataclass
class _Call:
    request: _Request
    index: int
    rows: KeyRows | None


_SERVING: ContextVar[_Call | None] = ContextVar("moleculerpy_cqrs_call_many", default=None)


async def serve_many(
    broker: ServiceBroker,
    ctx: Context,
    is_local: Callable[[str], bool],
    error_payload: ErrorPayload,
) -> dict[str, Any]:
    """Run the calls of one :data:`CALL_MANY` request on this node; answers their outcomes."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    calls = params.get("calls")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise InvalidInput(f"{CALL_MANY} takes a list of calls", field="calls")
    fields = params.get("fields")
    request = _Request(bool(params.get("serial")), fields if isinstance(fields, dict) else None)

    async def run(index: int, call: dict[str, Any]) -> dict[str, Any]:
        reset = _SERVING.set(_Call(request, index, _rows_of(call.get("rows"))))
        try:
            action = call.get("action")
            if not isinstance(action, str) or not is_local(action):
                raise ServiceNotFoundError(str(action), node_id=broker.nodeID)
            meta = call.get("meta") if isinstance(call.get("meta"), dict) else {}
            value = await broker.call(action, call.get("params") or {}, meta)
            return {"ok": True, "data": value}
        except Exception as error:
            return {"ok": False, "error": error_payload(error)}
        finally:
            _SERVING.reset(reset)

    answers: list[dict[str, Any]] = []
    if request.serial:
        for index, call in enumerate(calls):
            answer = await run(index, call)
            if request.stop is not None:
                break
            answers.append(answer)
    else:
        slots = asyncio.Semaphore(AT_ONCE)

        async def bounded(index: int, call: dict[str, Any]) -> dict[str, Any]:
            async with slots:
                return await run(index, call)

        answers = list(await asyncio.gather(*(bounded(i, c) for i, c in enumerate(calls))))
    return {"answers": answers}


def _rows_of(raw: Any) -> KeyRows | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("field"), str):
        return None
    rows = raw.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return KeyRows(raw["field"], raw.get("value"), rows)


async def read_here(action: str, ctx: Context) -> Outcome | None:
    """A read of the projector's aggregate made by a call of :data:`CALL_MANY` running
    here: answered from the rows the call carries when it can be (``(True, answer)``),
    refused when it comes too early in a serial request, else None (send it as usual)."""
    call = _SERVING.get()
    meta = getattr(ctx, "meta", None)
    if call is None or not isinstance(meta, dict):
        return None
    aggregate = meta.get(AGGREGATE_KEY)
    if not isinstance(aggregate, str) or not action.startswith(aggregate + "."):
        return None
    item = meta.get(ITEM_KEY)
    if call.request.serial and isinstance(item, int) and item > 0:
        call.request.stop = item if call.request.stop is None else min(call.request.stop, item)
        raise Conflict(
            f"this read of {aggregate} was made by call {item} of a request that carried "
            "several events: the answers before it are not applied yet (it is made again)"
        )
    method = action[len(aggregate) + 1 :]
    fields = call.request.fields
    if call.rows is None or fields is None or method not in ("find", "count"):
        return None
    rows = _KeyRows(aggregate, fields, call.rows)
    try:
        answer = await getattr(StoreActions(rows), method)(getattr(ctx, "params", None) or {})
    except _NotAnswerable:
        return None
    return True, answer


class _NotAnswerable(Exception):
    pass


class _KeyRows:
    """The rows of one key, read like the aggregate (``StoreActions``' ``Readable``); a query
    that may match rows of another key is not answerable here."""

    def __init__(self, name: str, fields: dict[str, Any], rows: KeyRows) -> None:
        self.name = name
        self.fields = fields
        self.rows = rows

    def _matching(self, query: Query) -> list[Record]:
        if not _pins(query.where, self.rows.field, self.rows.value):
            raise _NotAnswerable
        return [r for r in self.rows.rows if matches(query.where, r)]

    async def find(self, query: Query = ALL) -> list[Record]:
        rows = sorted(self._matching(query), key=sort_key(query.sort))
        end = None if query.limit is None else query.offset + query.limit
        names = query.fields
        return [
            {n: r.get(n) for n in names} if names else dict(r) for r in rows[query.offset : end]
        ]

    async def count(self, query: Query = ALL) -> int:
        return len(self._matching(query))

    async def get(self, entity_id: Any) -> Record | None:
        raise _NotAnswerable

    async def get_many(self, ids: Sequence[Any]) -> list[Record]:
        raise _NotAnswerable


def _pins(where: Condition | None, field: str, value: Any) -> bool:
    """Whether every row ``where`` matches has ``field`` equal to ``value``."""
    if isinstance(where, Compare):
        return where.field == field and where.op == "=" and _same(where.value, value)
    if isinstance(where, In):
        return (
            not where.negate and where.field == field and all(_same(v, value) for v in where.values)
        )
    if isinstance(where, And):
        return any(_pins(c, field, value) for c in where.items)
    return False


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
