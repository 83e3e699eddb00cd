"""Many transformation calls in one request to another node (see ``core/remote.py``).

The projector's node sends ``$cqrs.callMany`` to a node that serves a transformation; that
node calls the action locally once per call and answers every answer or error, in order. The
action is not a registered service's: every broker that :func:`~.compat.install` was applied
to serves it in its request handler, and says so in its node's INFO metadata
(``cqrsCallMany``), which is how a projector knows it may send many calls at once; to a node
without it (a Moleculer.js node, a plain MoleculerPy broker) it calls once per event.

While a call runs on the serving node, a read it makes of the projector's aggregate goes
through :func:`around_read`. In a non-serial (keyed) request, it is answered there from the
rows the call carries when it asks for no more than them (equality on the binding's key
field). In a serial request, every read is recorded with its answer (the projector checks
them before it uses the call's answer); a find whose params the request's ``known`` answers
cover, or that an earlier call of the request made, is answered there, patched by the answers
of the calls since (a partial update of a row by id); any other read goes to the projector's
node, marked as recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from moleculerpy.errors import ServiceNotFoundError

from moleculerpy_cqrs.core.joins import AGGREGATE_KEY, RECORDED_KEY
from moleculerpy_cqrs.core.port import KeyRows, ManyAnswers, ManyCall, Outcome, Read
from moleculerpy_cqrs.core.remote import canonical
from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.fields import ID, Record
from moleculerpy_cqrs.stores.query import (
    ALL,
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
    matches,
    parse_find,
    sort_key,
)

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
    calls: Sequence[ManyCall],
    *,
    serial: bool,
    fields: dict[str, Any] | None,
    known: Sequence[tuple[dict[str, Any], Any]] = (),
) -> dict[str, Any]:
    return {
        "serial": serial,
        "fields": fields,
        "known": [[params, answer] for params, answer in known],
        "calls": [
            {
                "action": c.action,
                "params": c.params,
                "meta": c.meta,
                "kind": c.kind,
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
    return ManyAnswers(outcomes, [_reads_of(a) for a in got])


def _reads_of(answer: Any) -> list[Read] | None:
    reads = answer.get("reads") if isinstance(answer, dict) else None
    if not isinstance(reads, list):
        return None
    out: list[Read] = []
    for read in reads:
        if not (isinstance(read, list) and len(read) == 3 and isinstance(read[0], str)):
            return None
        if not isinstance(read[1], dict):
            return None
        out.append((read[0], read[1], read[2]))
    return out


# ---------------------------------------------------------------------- the serving node


@dataclass
class _Cached:
    where: Condition | None
    rows: list[Record]


@dataclass
class _Request:
    serial: bool
    fields: dict[str, Any] | None
    cache: dict[str, _Cached] = field(default_factory=dict)  # serial: find answers by params

    def remember(self, params: Any, rows: Any) -> None:
        """Keep a find's answer for later calls, if it is a plain filter (no sort, paging or
        projection) whose answer stays right when a row is patched."""
        if self.fields is None or not isinstance(rows, list) or not isinstance(params, dict):
            return
        try:
            query = parse_find(self.fields, params)
        except Exception:
            return
        if query.sort or query.limit is not None or query.offset or query.fields is not None:
            return
        if all(isinstance(r, dict) and isinstance(r.get(ID), int) for r in rows):
            self.cache[canonical("find", params)] = _Cached(query.where, rows)

    def absorb(self, kind: Any, answer: Any, event_id: Any) -> None:
        """A call answered: patch the kept answers as the projector will apply it (a partial
        update of a row by id, stamped with the event's id when the aggregate has an
        ``eventId`` field); anything else may change any of them: forget them."""
        if answer is None or not self.cache:
            return
        if kind != "update" or not isinstance(answer, dict) or not isinstance(answer.get(ID), int):
            self.cache.clear()
            return
        changes = {k: v for k, v in answer.items() if k != ID}
        if self.fields is not None and "eventId" in self.fields and "eventId" not in changes:
            changes["eventId"] = event_id
        for key, cached in list(self.cache.items()):
            at = next((i for i, r in enumerate(cached.rows) if r.get(ID) == answer[ID]), None)
            if at is None:
                if _mentions(cached.where, changes):
                    del self.cache[key]  # the row may come to match: its answer is unknown
                continue
            patched = {**cached.rows[at], **changes}
            if matches(cached.where, patched):
                cached.rows[at] = patched
            else:
                del cached.rows[at]


@dataclass
class _Call:
    request: _Request
    index: int
    rows: KeyRows | None
    reads: list[list[Any]] | None = field(default_factory=list)


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

    async def run(state: _Call, call: dict[str, Any]) -> dict[str, Any]:
        reset = _SERVING.set(state)
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

    if request.serial:
        for item in params.get("known") or ():
            if isinstance(item, list) and len(item) == 2:
                request.remember(item[0], item[1])
        answers: list[dict[str, Any]] = []
        for index, call in enumerate(calls):
            state = _Call(request, index, None)
            answer = await run(state, call)
            answer["reads"] = state.reads
            event = call.get("params")
            event_id = event.get("id") if isinstance(event, dict) else None
            request.absorb(call.get("kind"), answer.get("data") if answer["ok"] else None, event_id)
            answers.append(answer)
        return {"answers": answers}
    slots = asyncio.Semaphore(AT_ONCE)

    async def bounded(index: int, call: dict[str, Any]) -> dict[str, Any]:
        async with slots:
            return await run(_Call(request, index, _rows_of(call.get("rows"))), call)

    return {"answers": list(await asyncio.gather(*(bounded(i, c) for i, c in enumerate(calls))))}


def _rows_of(raw: Any) -> KeyRows | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("field"), str):
        return None
    rows = raw.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return KeyRows(raw["field"], raw.get("value"), rows)


async def around_read(action: str, ctx: Context, send: Callable[[], Awaitable[Any]]) -> Any:
    """An outgoing request of this node (``send`` sends it). A read of the projector's
    aggregate made by a call of :data:`CALL_MANY` running here is answered here when it can
    be, and recorded in a serial request (see the module docstring)."""
    call = _SERVING.get()
    meta = getattr(ctx, "meta", None)
    if call is None or not isinstance(meta, dict):
        return await send()
    aggregate = meta.get(AGGREGATE_KEY)
    if not isinstance(aggregate, str) or not action.startswith(aggregate + "."):
        return await send()
    method = action[len(aggregate) + 1 :]
    params = getattr(ctx, "params", None) or {}
    request = call.request
    if not request.serial:
        if call.rows is not None and request.fields is not None and method in ("find", "count"):
            rows = _KeyRows(aggregate, request.fields, call.rows)
            try:
                return await getattr(StoreActions(rows), method)(params)
            except _NotAnswerable:
                pass
        return await send()
    cached = request.cache.get(canonical(method, params)) if method == "find" else None
    if cached is not None:
        answer: Any = [dict(r) for r in cached.rows]
    else:
        meta[RECORDED_KEY] = True
        try:
            answer = await send()
        except BaseException:
            call.reads = None  # a failed read: the call's answer cannot be checked
            raise
        if method == "find":
            request.remember(params, answer)
    if call.reads is not None:
        call.reads.append([method, params, answer])
    return answer


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


def _mentions(where: Condition | None, changes: Mapping[str, Any]) -> bool:
    """Whether ``where`` tests a field ``changes`` sets (then a changed row may come to
    match it)."""
    if where is None:
        return False
    if isinstance(where, And | Or):
        return any(_mentions(c, changes) for c in where.items)
    if isinstance(where, Search):
        return any(f in changes for f in where.fields) or not where.fields
    if isinstance(where, Compare | Like | In | Between | IsNull):
        return where.field in changes
    return True
