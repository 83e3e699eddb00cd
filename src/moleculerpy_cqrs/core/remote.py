"""Transformations served by another node: many events in one request.

A transformation action served on the projector's own node is called once per event (a local
call costs tens of microseconds). One served only on another node would cost a network round
trip per event, and CPU on both sides for each; so the projector sends that node many events
in one request (:meth:`~.port.BrokerPort.call_many`), which calls the action locally for each
and answers every answer or error. Answers are still applied to the batch in log order, one
event at a time, with the usual retries, dead letters and halting; a request that fails as a
whole (the node died, a timeout) leaves its events unanswered, and each is then retried on its
own like any failed call. Nothing is written before the batch commits, so nothing is applied
twice.

How the answers keep "a transformation sees the effect of every earlier event":

* **Serial requests** (:class:`Pipeline`), for a batch whose bindings have no key, or whose
  every binding another node serves so: the serving node runs a request's calls one after
  another and records every read of the aggregate each makes, with its answer. Up to
  ``DEPTH`` requests are out at once; those of one batch form a session, which the serving
  node runs in the order sent, keeping from request to request the answers of the finds its
  calls made and the rows of the keys they carried (:class:`~.port.KeyRows`, for an
  ``update`` or ``remove`` binding whose key names an aggregate field), each patched by the
  answers of the calls since as the projector will apply them. The first request of a
  session also carries the answers of the finds read lately (:class:`ReadSet`), as the batch
  holds them. A read that these answer is answered there; any other goes back to the
  projector's node. Such answers may be out of date (the patching is a guess; a read that went
  back was answered before the calls ahead of it were applied), so the projector applies the
  answers in order and, before each but the first of a session, asks its reads again of the
  batch (:meth:`ReadSet.still_true`): if one answers differently, that answer and every
  answer after it (the requests still out too) are dropped, the session ends, and those events
  go in a new one. A transformation is a function of its event and its reads, so an answer
  whose reads still hold is the answer it would give now: every transformation sees every
  earlier event's effect, as when it runs here.
* **Keyed bindings in a batch that also has local ones** (:class:`KeyedCalls`): a call is made
  only once the earlier events of its key are applied (as :class:`~.projector.KeyedRun` does
  for local calls), so calls that wait together are independent and go in one request,
  each with its key's rows as the batch holds them then; a read that asks for no more than
  them is answered on the serving node with no call back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from moleculerpy_cqrs.core.joins import ITEM_KEY, BatchToken, OpenBatches
from moleculerpy_cqrs.core.port import BrokerPort, KeyRows, ManyAnswers, ManyCall, Outcome, Read
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.query import Compare, Query, parse_find

if TYPE_CHECKING:
    from moleculerpy_cqrs.core.batch import BatchView

MAX_CALLS: Final = 256  # calls in one request
IN_FLIGHT: Final = 4  # requests to one node at once, for one keyed batch
DEPTH: Final = 3  # serial requests to one node at once, for one batch
FIRST_CHUNK: Final = 16  # calls in the first request of a session (then twice as many each)
KNOWN_READS: Final = 64  # find params whose answers a serial request carries
KNOWN_ROWS: Final = 100  # rows in one such answer at most (a larger one is left out)
PARSED: Final = 1024  # plain find params kept parsed, for checking reads


class KeyedCalls:
    """The calls of one keyed batch that go to other nodes, gathered into requests.

    A call waits in its node's queue; a request leaves as soon as fewer than ``IN_FLIGHT``
    are out (on the next turn of the event loop, so that the calls that became ready
    together leave together), carrying up to ``MAX_CALLS`` calls. While requests are out,
    the calls made ready by their answers gather for the next one.
    """

    def __init__(self, port: BrokerPort, fields: dict[str, Any]) -> None:
        self.port = port
        self.fields = fields
        self._queues: dict[str, list[tuple[ManyCall, asyncio.Future[Outcome]]]] = {}
        self._out: dict[str, int] = {}
        self._scheduled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def call(self, node: str, call: ManyCall) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(node, []).append((call, future))
        self._schedule(node)
        return await future

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()

    def _schedule(self, node: str) -> None:
        if self._closed or node in self._scheduled or self._out.get(node, 0) >= IN_FLIGHT:
            return
        self._scheduled.add(node)
        asyncio.get_running_loop().call_soon(self._flush, node)

    def _flush(self, node: str) -> None:
        self._scheduled.discard(node)
        queue = self._queues.get(node)
        if not queue:
            return
        taken, self._queues[node] = queue[:MAX_CALLS], queue[MAX_CALLS:]
        self._out[node] = self._out.get(node, 0) + 1
        task = asyncio.create_task(self._send(node, taken))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._queues[node]:
            self._schedule(node)

    async def _send(self, node: str, taken: list[tuple[ManyCall, asyncio.Future[Outcome]]]) -> None:
        try:
            try:
                answers = await self.port.call_many(
                    node, [c for c, _ in taken], serial=False, fields=self.fields
                )
                outcomes = answers.outcomes
            except Exception as error:  # the request as a whole failed
                outcomes = [(False, error)] * len(taken)
            for (_, future), outcome in zip(taken, outcomes, strict=False):
                if not future.done():
                    future.set_result(outcome)
            for _, future in taken[len(outcomes) :]:
                if not future.done():
                    future.set_result((False, RuntimeError("the request answered too few")))
        finally:
            self._out[node] -= 1
            if self._queues.get(node):
                self._schedule(node)


async def key_rows(view: BatchView, field: str, value: Any) -> KeyRows | None:
    """Every row whose ``field`` is ``value``, as ``view`` holds them now; None when that
    cannot be read (e.g. a value of the wrong type) or is more than ``KNOWN_ROWS`` rows (too
    much to send with each call): the reads then go back as before."""
    if field not in view.fields or value is None:
        return None
    try:
        rows = await view.find(Query(where=Compare(field, "=", value), limit=KNOWN_ROWS + 1))
    except Exception:
        return None
    return KeyRows(field, value, rows) if len(rows) <= KNOWN_ROWS else None


@dataclass
class _Sent:
    """A serial request out: the place of its first unit in the batch, its calls' item
    numbers, and the task that answers it."""

    start: int
    items: list[int]
    head: bool  # its first call reads the batch as it is (nothing before it unapplied)
    task: asyncio.Task[ManyAnswers]


class Pipeline:
    """The serial requests of one batch to other nodes (see the module docstring), up to
    ``DEPTH`` out at once to one node.

    The requests of one pipeline form a *session* on the serving node, which runs them one
    after another in the order sent and keeps their finds' answers and their keys' rows from
    one request to the next, patched by the answers since: a call of the next request sees the
    effects of this one's calls before the projector has applied them. The first request of a
    session (its *head*) carries the answers of the reads lately made (``known``); the
    session ends (:meth:`reset`) when an answer is dropped, and the next request, sent once
    every earlier answer is applied, starts a new one.
    """

    def __init__(
        self,
        port: BrokerPort,
        view: BatchView,
        reads: ReadSet,
        sizer: ChunkSizer,
        batches: OpenBatches,
        token: BatchToken,
    ) -> None:
        self.port = port
        self.view = view
        self.reads = reads
        self.sizer = sizer
        self.batches = batches
        self.token = token
        self.node: str | None = None
        self._out: deque[_Sent] = deque()
        self._session = ""
        self._seq = 0
        self._item = 0  # the last item number given (0 is a head's first call)
        self._ramp = FIRST_CHUNK
        self.asked = 0  # how many calls the request :meth:`answers` last answered carried

    @property
    def out(self) -> int:
        return len(self._out)

    def takes(self, node: str) -> bool:
        """Whether a request to ``node`` may leave now."""
        return len(self._out) < DEPTH and (not self._out or node == self.node)

    def size(self) -> int:
        """How many calls the next request may carry."""
        return min(self.sizer.size, self._ramp)

    async def rows_for(self, field: str | None, value: Any) -> KeyRows | None:
        """The rows of a key, to send with a call (the serving node uses its own when the
        session has them: these may be older)."""
        return None if field is None else await key_rows(self.view, field, value)

    async def send(self, node: str, start: int, calls: Sequence[ManyCall]) -> None:
        """Send ``calls`` (the units from ``start`` on, each made for this send: its meta
        gets its number here) to ``node``."""
        head = not self._out
        if head:  # nothing before ``start`` is unapplied: a new session
            self._session, self._seq, self._ramp = secrets.token_hex(8), 0, FIRST_CHUNK
        items = []
        for i in range(len(calls)):
            if head and i == 0:
                items.append(0)
            else:
                self._item += 1
                items.append(self._item)
        for call, n in zip(calls, items, strict=True):
            call.meta[ITEM_KEY] = n
        known = await self.reads.known(self.view) if head else []
        session = (self._session, self._seq)
        self._seq += 1
        self._ramp = min(self._ramp * 2, MAX_CALLS)
        self.node = node
        # Sent now (an eager task: its request is made and handed to the transporter before
        # this returns), then one turn of the event loop, so that the transporter's writer
        # puts it on the wire: the projector may run answers for a while without letting the
        # loop turn, and the serving node would wait for the request all that time.
        task = asyncio.Task(
            self.port.call_many(
                node, calls, serial=True, fields=self.view.fields, known=known, session=session
            ),
            loop=asyncio.get_running_loop(), eager_start=True,
        )  # fmt: skip
        self._out.append(_Sent(start, items, head, task))
        await asyncio.sleep(0)

    async def answers(self) -> tuple[int, bool, list[tuple[Outcome, list[Read] | None]], bool]:
        """The oldest request's answers: (its first unit's place, whether it is a head, each
        call's outcome and reads, whether the request as a whole failed). A call that read
        the aggregate here unrecorded has its reads None."""
        sent = self._out.popleft()
        self.asked = len(sent.items)
        try:
            answers = await sent.task
        except Exception as error:
            return sent.start, sent.head, [((False, error), None)], True
        unrecorded = self.batches.unrecorded(self.token)
        got = [
            (o, None if n in unrecorded else r)
            for n, o, r in zip(sent.items, answers.outcomes, answers.reads, strict=False)
        ]
        if not got:
            failed = RuntimeError(f"{self.node} answered none of the calls")
            return sent.start, sent.head, [((False, failed), None)], True
        return sent.start, sent.head, got, False

    def reset(self) -> None:
        """Drop the requests still out (their answers were made on what is no longer so)."""
        for sent in self._out:
            sent.task.cancel()
            sent.task.add_done_callback(_quiet)
        self._out.clear()

    async def close(self) -> None:
        tasks = [s.task for s in self._out]
        self.reset()
        await asyncio.gather(*tasks, return_exceptions=True)


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a dropped request's failure is of no interest


class ReadSet:
    """The find params the calls of one projector's serial requests read lately (at most
    ``KNOWN_READS``): the first request of each session carries their answers as the batch
    holds them, so that the serving node answers such reads itself. Also checks a call's reads
    against the batch (:meth:`still_true`), parsing each plain find's params once."""

    def __init__(self) -> None:
        self._recent: dict[str, dict[str, Any]] = {}
        self._parsed: dict[str, Query] = {}  # plain finds' params, parsed (at most PARSED)

    async def still_true(self, view: BatchView, reads: list[Read] | None) -> bool:
        """Whether every read a call made answers the same from ``view`` now: then its
        answer is the one it would give now (a transformation is a function of its event and
        its reads). Notes the reads when they do."""
        if reads is None:
            return False
        if not reads:
            return True
        actions = StoreActions(view)
        names: list[str | None] = []
        for method, params, answer in reads:
            if method not in ("find", "count", "get"):
                return False
            name = canonical(method, params) if method == "find" else None
            names.append(name)
            try:
                if name is not None and params.keys() <= {"query"}:  # a plain find
                    query = self._parsed.get(name)
                    if query is None:
                        query = self._parsed[name] = parse_find(view.fields, params)
                        if len(self._parsed) > PARSED:
                            del self._parsed[next(iter(self._parsed))]
                    now: Any = await view.find(query)
                else:
                    now = await getattr(actions, method)(params)
            except Exception:
                return False
            if now != answer and _plain(now) != _plain(answer):
                return False
        self._note(reads, names)
        return True

    def note(self, reads: list[Read] | None) -> None:
        """Note the reads of a call whose answer is used unchecked."""
        if reads:
            self._note(reads, [canonical(m, p) if m == "find" else None for m, p, _ in reads])

    def _note(self, reads: list[Read], names: list[str | None]) -> None:
        for (_, params, _), name in zip(reads, names, strict=True):
            if name is None:
                continue
            self._recent.pop(name, None)
            self._recent[name] = params
            if len(self._recent) > KNOWN_READS:
                del self._recent[next(iter(self._recent))]

    async def known(self, view: BatchView) -> list[tuple[dict[str, Any], Any]]:
        actions = StoreActions(view)
        out = []
        for key, params in list(self._recent.items()):
            try:
                rows = await actions.find(params)
            except Exception:
                rows = None
            if rows is None or len(rows) > KNOWN_ROWS:
                del self._recent[key]  # cannot be answered, or too much to send each time
            else:
                out.append((params, rows))
        return out


def canonical(method: str, params: Any) -> str:
    return json.dumps([method, params], sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    """As it travels (JSON), so that a local answer compares with one that travelled."""
    return json.loads(json.dumps(value, default=str))


class ChunkSizer:
    """How many calls the next serial request carries: twice as many while every answer
    holds; after a request cut short (a call's reads no longer answer the same), as many as
    held, for ``HOLD`` requests, before trying more again."""

    HOLD: Final = 4

    def __init__(self) -> None:
        self.size = FIRST_CHUNK
        self.held = 0

    def answered(self, asked: int, answered: int) -> None:
        if answered < asked:
            self.size, self.held = max(answered, 1), self.HOLD
        elif self.held > 0:
            self.held -= 1
        else:
            self.size = min(self.size * 2, MAX_CALLS)
