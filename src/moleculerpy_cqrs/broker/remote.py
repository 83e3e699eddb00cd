"""Many transformation calls in one request to another node (see ``core/remote.py``).

The projector's node sends ``$cqrs.callMany`` to a node that serves a transformation; that
node calls the action locally once per call and answers every answer or error, in order. The
action is not a registered service's: every broker that :func:`~.compat.install` was applied
to serves it in its request handler, and says so in its node's INFO metadata
(``cqrsCallMany``), which is how a projector knows it may send many calls at once; to a node
without it (a Moleculer.js node, a plain MoleculerPy broker) it calls once per event.

While a call runs on the serving node, a read it makes of the projector's aggregate is
answered there when it can be: ``broker.call`` asks :func:`answer_here` first (before a
context is made), and an outgoing request goes through :func:`around_read`. A read that asks
for no more than the rows the call carries (equality on the binding's key field) is answered
from them. In a serial request, every read is recorded with its answer (the projector checks
them before it uses the call's answer); a find that the request's ``known`` answers cover, or
that an earlier call of its session made, is answered from what the session kept
(``broker/remote_kept.py``): those answers and the key rows, patched by the answers of the
calls since; any other read goes to the projector's node, marked as recorded. The requests of
one session (``session``: its id and the request's number) run one after another in the
order they arrive, and each starts from what the earlier ones kept (:class:`Sessions`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from moleculerpy_cqrs.broker.remote_kept import Kept
from moleculerpy_cqrs.core.joins import AGGREGATE_KEY, RECORDED_KEY
from moleculerpy_cqrs.core.port import KeyRows, ManyAnswers, ManyCall, Outcome, Read
from moleculerpy_cqrs.core.remote import canonical
from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.fields import Record
from moleculerpy_cqrs.stores.query import (
    ALL,
    And,
    Compare,
    Condition,
    In,
    Query,
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
SESSIONS_KEPT: Final = 16  # serial sessions a serving node keeps (the least recently used go)
PARSED_KEPT: Final = 1024  # plain find params a session keeps parsed

ErrorPayload = Callable[[Exception], dict[str, Any]]
RunLocal = Callable[[str, dict[str, Any], dict[str, Any], str], Awaitable[Any]]
"""Runs a local action (name, params, meta, a context id), as an incoming request would;
raises ``ServiceNotFoundError`` when no local service serves it."""
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
    session: tuple[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "serial": serial,
        "session": None if session is None else list(session),
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
class _Request:
    serial: bool
    fields: dict[str, Any] | None
    kept: Kept = field(init=False)  # serial: find answers and key rows, patched
    parsed: dict[str, Query] = field(default_factory=dict)  # plain finds' params, parsed

    def __post_init__(self) -> None:
        self.kept = Kept(self.fields)

    def plain(self, method: str, params: Any) -> tuple[str, Query] | None:
        """A find or count whose params are only a filter (``query``), parsed (once per
        session): its canonical name and query. None for any other read."""
        if method not in ("find", "count") or self.fields is None or not isinstance(params, dict):
            return None
        if not params.keys() <= {"query"}:
            return None
        name = canonical(method, params)
        query = self.parsed.get(name)
        if query is None:
            query = self.parsed[name] = parse_find(self.fields, params)  # raises as find does
            if len(self.parsed) > PARSED_KEPT:
                del self.parsed[next(iter(self.parsed))]
        return name, query

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
        self.kept.keep_find(canonical("find", params), query.where, rows)


@dataclass
class _Call:
    request: _Request
    index: int
    rows: KeyRows | None
    reads: list[list[Any]] | None = field(default_factory=list)


_SERVING: ContextVar[_Call | None] = ContextVar("moleculerpy_cqrs_call_many", default=None)


@dataclass
class _Session:
    request: _Request
    next: int = 0  # the number of the request it expects next
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """The serial sessions a serving node keeps (at most ``SESSIONS_KEPT``; see
    ``core/remote.py``'s ``Pipeline``): a session's requests run one after another, in the
    order they arrive (the order they were sent), each with the find answers and key rows
    the earlier ones left. A request out of turn (one before it was lost) starts from none:
    its calls' reads go to the projector's node, which checks them all the same."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, _Session] = OrderedDict()

    def of(self, session: str, fields: dict[str, Any] | None) -> _Session:
        kept = self._kept.pop(session, None) or _Session(_Request(True, fields))
        self._kept[session] = kept
        if len(self._kept) > SESSIONS_KEPT:
            self._kept.popitem(last=False)
        return kept


async def serve_many(
    broker: ServiceBroker,
    ctx: Context,
    run_local: RunLocal,
    error_payload: ErrorPayload,
    sessions: Sessions,
) -> dict[str, Any]:
    """Run the calls of one :data:`CALL_MANY` request on this node; answers their outcomes."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    calls = params.get("calls")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise InvalidInput(f"{CALL_MANY} takes a list of calls", field="calls")
    fields = params.get("fields")
    fields = fields if isinstance(fields, dict) else None
    serial = bool(params.get("serial"))
    session = params.get("session")
    if serial and isinstance(session, list) and len(session) == 2:
        kept = sessions.of(str(session[0]), fields)
        async with kept.lock:  # taken in arrival order (nothing awaits before it)
            if session[1] != kept.next:
                kept.request = _Request(True, fields)
            kept.next = int(session[1]) + 1 if isinstance(session[1], int) else -1
            return await _serve_serially(ctx, kept.request, params, run_local, error_payload)
    request = _Request(serial, fields)
    if serial:
        return await _serve_serially(ctx, request, params, run_local, error_payload)
    slots = asyncio.Semaphore(AT_ONCE)

    async def bounded(index: int, call: dict[str, Any]) -> dict[str, Any]:
        async with slots:
            state = _Call(request, index, _rows_of(call.get("rows")))
            return await _run(f"{ctx.id}-{index}", state, call, run_local, error_payload)

    return {"answers": list(await asyncio.gather(*(bounded(i, c) for i, c in enumerate(calls))))}


async def _serve_serially(
    ctx: Context,
    request: _Request,
    params: dict[str, Any],
    run_local: RunLocal,
    error_payload: ErrorPayload,
) -> dict[str, Any]:
    for item in params.get("known") or ():
        if isinstance(item, list) and len(item) == 2:
            request.remember(item[0], item[1])
    answers: list[dict[str, Any]] = []
    for index, call in enumerate(params["calls"]):
        sent = _rows_of(call.get("rows"))
        state = _Call(request, index, None if sent is None else request.kept.key_rows(sent))
        answer = await _run(f"{ctx.id}-{index}", state, call, run_local, error_payload)
        answer["reads"] = state.reads
        event = call.get("params")
        event_id = event.get("id") if isinstance(event, dict) else None
        request.kept.absorb(
            call.get("kind"), answer.get("data") if answer["ok"] else None, event_id
        )
        answers.append(answer)
    return {"answers": answers}


async def _run(
    context_id: str,
    state: _Call,
    call: dict[str, Any],
    run_local: RunLocal,
    error_payload: ErrorPayload,
) -> dict[str, Any]:
    reset = _SERVING.set(state)
    try:
        action = call.get("action")
        meta = call.get("meta")
        params = call.get("params")
        value = await run_local(
            str(action),
            params if isinstance(params, dict) else {},
            meta if isinstance(meta, dict) else {},
            context_id,
        )
        return {"ok": True, "data": value}
    except Exception as error:
        return {"ok": False, "error": error_payload(error)}
    finally:
        _SERVING.reset(reset)


def _rows_of(raw: Any) -> KeyRows | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("field"), str):
        return None
    rows = raw.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return KeyRows(raw["field"], raw.get("value"), rows)


def serving() -> bool:
    """Whether a call of :data:`CALL_MANY` runs here now (in this task)."""
    return _SERVING.get() is not None


async def answer_here(action: str, params: Any, meta: Any) -> Any:
    """A read of the projector's aggregate made by a call of :data:`CALL_MANY` running here,
    answered here (from the call's key rows, or in a serial request from the kept answers;
    recorded there): then no request is made. :data:`NOT_HERE` when it must go to the
    projector's node."""
    call = _SERVING.get()
    if call is None or not isinstance(meta, dict):
        return NOT_HERE
    aggregate = meta.get(AGGREGATE_KEY)
    if not isinstance(aggregate, str) or not action.startswith(aggregate + "."):
        return NOT_HERE
    method = action[len(aggregate) + 1 :]
    params = params or {}
    request = call.request
    answer: Any = NOT_HERE
    plain = request.plain(method, params)
    if call.rows is not None and request.fields is not None and method in ("find", "count"):
        try:
            rows = _KeyRows(aggregate, request.fields, call.rows)
            if plain is None:
                answer = await getattr(StoreActions(rows), method)(params)
            elif method == "find":
                answer = await rows.find(plain[1])
            else:
                answer = await rows.count(plain[1])
        except _NotAnswerable:
            pass
    if not request.serial:
        return answer
    if answer is NOT_HERE and method == "find":
        cached = request.kept.find(canonical(method, params) if plain is None else plain[0])
        answer = NOT_HERE if cached is None else cached
    if answer is not NOT_HERE and call.reads is not None:
        call.reads.append([method, params, answer])
    return answer


async def around_read(action: str, ctx: Context, send: Callable[[], Awaitable[Any]]) -> Any:
    """An outgoing request of this node (``send`` sends it). A read of the projector's
    aggregate made by a call of :data:`CALL_MANY` running here is answered here when it can
    be (:func:`answer_here`), and recorded in a serial request (see the module docstring)."""
    call = _SERVING.get()
    if call is None:
        return await send()
    meta = getattr(ctx, "meta", None)
    params = getattr(ctx, "params", None) or {}
    answer = await answer_here(action, params, meta)
    if answer is not NOT_HERE:
        return answer
    aggregate = meta.get(AGGREGATE_KEY) if isinstance(meta, dict) else None
    if not (call.request.serial and isinstance(aggregate, str)):
        return await send()
    if not action.startswith(aggregate + "."):
        return await send()
    assert isinstance(meta, dict)
    meta[RECORDED_KEY] = True
    try:
        answer = await send()
    except BaseException:
        call.reads = None  # a failed read: the call's answer cannot be checked
        raise
    method = action[len(aggregate) + 1 :]
    if method == "find":
        call.request.remember(params, answer)
    if call.reads is not None:
        call.reads.append([method, params, answer])
    return answer


class _NotAnswerable(Exception):
    pass


NOT_HERE: Final = object()


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
