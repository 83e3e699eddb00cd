"""The event store at run time: the log's adapter, the group committer and the dispatcher."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from moleculerpy_cqrs.core.committer import GroupCommitter
from moleculerpy_cqrs.core.dispatcher import Dispatcher
from moleculerpy_cqrs.core.joins import PRIVATE_META
from moleculerpy_cqrs.core.lease import DEFAULT_TTL, Lease
from moleculerpy_cqrs.core.log import Listeners
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.core.records import (
    EVENT_VERSION,
    IDEMPOTENCY_KEY,
    MAX_KEY_LENGTH,
    EventType,
    Status,
    now_ms,
)
from moleculerpy_cqrs.core.schema import refuse_event_log_drift
from moleculerpy_cqrs.core.states import DispatcherState
from moleculerpy_cqrs.core.upcast import Upcasters
from moleculerpy_cqrs.errors import ConfigurationError, ConflictError, InvalidInput, StoreError
from moleculerpy_cqrs.stores.base import Adapter, CheckedRow, Keyed
from moleculerpy_cqrs.stores.fields import Record, check_json
from moleculerpy_cqrs.stores.query import And, Compare, In, Query, parse_condition

MAX_PAYLOAD_BYTES: Final = 1_048_576
READY_TIMEOUT: Final = 30.0
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
log = logging.getLogger(__name__)


class EventStoreRuntime:
    def __init__(
        self,
        name: str,
        make_adapter: Callable[[], Adapter],
        port: BrokerPort,
        *,
        dispatch_batch_size: int = 100,
        dispatch_attempts: int = 5,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        node_id: str = "node",
        lease_ttl: float = DEFAULT_TTL,
        upcasters: Upcasters | None = None,
    ) -> None:
        self.name = name
        self.upcasters = upcasters or Upcasters(name)
        self.port = port
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self.max_payload_bytes = max_payload_bytes
        self.listeners = Listeners()
        self._make_adapter = make_adapter
        self._dispatch = {"batch_size": dispatch_batch_size, "max_attempts": dispatch_attempts}
        self.started = False
        self.duplicates = 0
        self.ready = asyncio.Event()
        self._announcing: asyncio.Task[None] | None = None
        self._build()

    def _build(self) -> None:
        """Fresh parts around a fresh adapter (an adapter is not reopened once closed)."""
        self.adapter = self._make_adapter()
        if self.adapter.indexes.get(IDEMPOTENCY_KEY) is not True:
            raise ConfigurationError(
                f"event store {self.name!r}: its adapter must declare {IDEMPOTENCY_KEY!r} "
                "unique (make it from core.records.EVENT_FIELDS, which does)"
            )
        self.committer = GroupCommitter(self.adapter, self._committed, key_field=IDEMPOTENCY_KEY)
        self.lease = Lease(self.adapter, "dispatch.lease", self.node_id, self.lease_ttl)
        self.dispatcher = Dispatcher(
            self.adapter, self.port, lease=self.lease, upcasters=self.upcasters, **self._dispatch
        )
        self.closed = False
        self.schema_checked = False  # a fresh adapter: its table is looked at again

    async def check_schema(self) -> None:
        """Refuse to start on a log whose extra fields changed type (before
        :meth:`Adapter.connect` adds the fields declared since); the adapter is closed with
        the refusal, and the next start builds a fresh one."""
        try:
            stored = await self.adapter.stored_fields()
            refuse_event_log_drift(self.name, self.adapter.fields, stored)
            self.schema_checked = True
        except ConfigurationError:
            await self.adapter.close()
            self.closed = True
            raise

    async def start(self, *, dispatch: bool = True) -> None:
        if self.closed:
            self._build()
        if not self.schema_checked:  # the broker layer checks while it registers the service
            await self.check_schema()
        await self.adapter.connect()
        self.started = True
        self.ready.set()
        if dispatch:
            self.dispatcher.start()

    async def stop(self) -> None:
        self.started = False
        self.ready.clear()
        if self._announcing is not None:
            await asyncio.gather(self._announcing, return_exceptions=True)
        await self.dispatcher.stop()
        await self.committer.close()
        await self.adapter.close()
        self.closed = True

    async def append(
        self,
        event: str,
        payload: Any,
        *,
        extras: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        event_type: EventType = EventType.COMMAND,
        version: int = EVENT_VERSION,
        idempotency_key: Any = None,
        compare: bool = True,
    ) -> Record:
        """Check, then append one event; answers the stored row once it is durable.

        With an ``idempotency_key``, the event is stored at most once per key: a repeat is
        answered the event stored first, and stores nothing. With ``compare``, a repeat whose
        event, payload or extras differ (compared canonically) is a :class:`ConflictError`.
        """
        keyed = await self.append_once(
            event,
            payload,
            extras=extras,
            meta=meta,
            event_type=event_type,
            version=version,
            idempotency_key=idempotency_key,
            compare=compare,
        )
        return keyed.row

    async def append_once(
        self,
        event: str,
        payload: Any,
        *,
        extras: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        event_type: EventType = EventType.COMMAND,
        version: int = EVENT_VERSION,
        idempotency_key: Any = None,
        compare: bool = True,
    ) -> Keyed:
        """:meth:`append`, answering also whether this call stored the event (false: a
        repeat of its idempotency key, answered the event stored before)."""
        key = check_idempotency_key(idempotency_key)
        now = now_ms()
        record = {
            **(extras or {}),
            "event": event,
            "version": version,
            "created": now,
            "updated": now,
            "status": int(Status.CREATED),
            "eventType": int(event_type),
            "payload": payload,
            "meta": self._clean_meta(meta),
            "attempts": 0,
            IDEMPOTENCY_KEY: key,
        }
        row = self._check(record)
        await until_ready(self.ready, self.name)
        if row.adapter is not self.adapter:  # restarted meanwhile, with a fresh adapter
            row = self._check(record)
        if key is None:
            return Keyed(await self.committer.append(row), True)
        keyed = await self.committer.append_keyed(row)
        if keyed.stored:
            return keyed
        if compare and not _same_command(row.record, keyed.row, extras or {}):
            raise ConflictError(
                f"idempotency key {key!r} is already held by event {keyed.row['id']} "
                f"({keyed.row['event']}) with other params: a key names one command; "
                "use a new key for a new command",
                key=key,
                id=keyed.row["id"],
                event=keyed.row["event"],
            )
        self.duplicates += 1
        return keyed

    async def record_snapshot(self, event: str, payload: dict[str, Any]) -> Record:
        """Store a snapshot-created event (eventType 1)."""
        return await self.append(event, payload, event_type=EventType.SNAPSHOT_CREATED)

    async def settle_snapshot(
        self, event_id: int, payload: dict[str, Any], error: str | None
    ) -> Record:
        """Mark a snapshot event completed (2) or failed (3, with the error)."""
        # The action that calls this is open to any client: it must never rewrite a command.
        current = await self.adapter.get(event_id)
        if current is None or not _is_snapshot(current):
            raise InvalidInput(
                f"event {event_id} is not a snapshot event: only a '<aggregate>.snapshot' "
                "event recorded by recordSnapshot can be settled",
                field="id",
            )
        kind = EventType.SNAPSHOT_FAILED if error else EventType.SNAPSHOT_COMPLETED
        row = await self.adapter.update(
            event_id,
            {
                "eventType": int(kind),
                "payload": payload,
                "error": error[:4000] if error else None,
                "status": int(Status.COMPLETE),
                "updated": now_ms(),
            },
        )
        if row is None:
            raise InvalidInput(f"no snapshot event with id {event_id}")
        return row

    async def snapshots(self, event: str) -> list[Record]:
        """The snapshot events stored as ``event`` (``<aggregate>.snapshot``), oldest first."""
        kinds = (
            EventType.SNAPSHOT_CREATED,
            EventType.SNAPSHOT_COMPLETED,
            EventType.SNAPSHOT_FAILED,
        )
        where = And((Compare("event", "=", event), In("eventType", tuple(int(k) for k in kinds))))
        return await self.adapter.find(Query(where=where))

    async def read(self, after: int, limit: int, *, raw: bool = False) -> dict[str, Any]:
        """The events after ``after`` (at most ``limit`` stored ones) as read now — current
        name and version, split ones as their pieces — or as stored (``raw``)."""
        events = await self.adapter.read_after(after, limit) if limit else []
        if not raw:
            events = self.upcasters.read_all(events, in_place=True)  # fresh rows, ours
        return {"events": events, "head": await self.adapter.head()}

    async def count(self, query: Mapping[str, Any]) -> int:
        return await self.adapter.count(Query(where=parse_condition(self.adapter.fields, query)))

    async def status(self) -> dict[str, Any]:
        head = await self.adapter.head()
        d = self.dispatcher
        state = (
            DispatcherState.STANDBY
            if d.standby
            else DispatcherState.RUNNING
            if d.running
            else DispatcherState.STOPPED
        )
        return {
            "kind": "eventStore",
            "name": self.name,
            "head": head,
            "appended": self.committer.appended,
            "commits": self.committer.batches,
            "duplicates": self.duplicates,
            "versions": self.upcasters.versions(),
            "renames": self.upcasters.renamed(),
            "dispatcher": {
                "state": str(state),
                "running": d.running,
                "standby": d.standby,
                "cursor": d.cursor,
                "lag": max(head - d.cursor, 0),
                "delivered": d.delivered,
                "failed": d.failed,
                "lastError": d.last_error,
                "lease": await self.lease.holder(),
            },
        }

    def _committed(self, rows: list[Record]) -> None:
        self.dispatcher.wake()
        self.listeners.notify()
        if self._announcing is None or self._announcing.done():
            self._announcing = asyncio.create_task(self._announce(), name="cqrs-announce")

    async def _announce(self) -> None:
        """Wake workers on other nodes (they read through ``<name>.read``). This node's
        dispatcher and projectors were woken by ``_committed``: with no other node
        listening, a broadcast (a broker context and task per commit, as much CPU as the
        append's own call with one caller) is skipped."""
        await asyncio.sleep(0)  # coalesce the commits of this loop iteration
        try:
            await self.port.broadcast(f"cqrs.{self.name}.appended", {"head": 0}, others_only=True)
        except Exception:
            log.exception("event store %s: could not announce new events", self.name)

    def _check(self, record: Record) -> CheckedRow:
        """The record checked and encoded for the log's adapter, once; the payload's size
        is measured on its encoded text."""
        try:
            row = self.adapter.check_row(record)
        except InvalidInput as error:
            if error.field == "meta":
                # Meta is context, not the command: entries that cannot be stored are left
                # out rather than refusing the command. (The payload, checked before the
                # meta, passed.)
                record["meta"] = {k: v for k, v in record["meta"].items() if _storable(k, v)}
                row = self.adapter.check_row(record)
            elif error.field == "payload":
                raise InvalidInput(
                    f"the payload must be JSON that reads back as written: {error}",
                    field="payload",
                ) from None
            else:
                raise
        text = row.json.get("payload", "")
        size = len(text) if len(text) * 4 <= self.max_payload_bytes else len(text.encode())
        if size > self.max_payload_bytes:
            raise InvalidInput(
                f"the payload is {size} bytes; the limit is {self.max_payload_bytes} "
                "(EventStore(..., max_payload_bytes=...) raises it)",
                field="payload",
            )
        return row

    @staticmethod
    def _clean_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
        if not meta:
            return {}
        # The key is stored in its own column, not twice.
        return {k: v for k, v in meta.items() if k not in PRIVATE_META and k != IDEMPOTENCY_KEY}


def check_idempotency_key(key: Any) -> str | None:
    """An idempotency key as given, or :class:`InvalidInput` (422) saying what to fix."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidInput(
            f"the idempotency key must be a string, not {type(key).__name__}",
            field=IDEMPOTENCY_KEY,
        )
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(
            f"the idempotency key must be 1 to {MAX_KEY_LENGTH} characters, not {len(key)}",
            field=IDEMPOTENCY_KEY,
        )
    if "\x00" in key:
        raise InvalidInput("the idempotency key must not hold NUL", field=IDEMPOTENCY_KEY)
    if not key.isascii() and _SURROGATE.search(key):
        raise InvalidInput(
            "the idempotency key must be valid Unicode (it holds a lone surrogate)",
            field=IDEMPOTENCY_KEY,
        )
    return key


def _same_command(new: Record, stored: Record, extras: Mapping[str, Any]) -> bool:
    """Whether a repeat carries the command stored: same event (name, kind and version),
    payload and extras, compared
    as canonical JSON (key order does not matter; meta is context and is not compared)."""
    if any(new[n] != stored[n] for n in ("event", "eventType", "version")):
        return False
    names = ("payload", *extras)
    return all(_canonical(new.get(n)) == _canonical(stored.get(n)) for n in names)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


async def until_ready(ready: asyncio.Event, name: str) -> None:
    """Wait (bounded) for a store to be started: MoleculerPy announces a node's services,
    and so lets calls in, before their ``started()`` has run."""
    if ready.is_set():
        return
    try:
        await asyncio.wait_for(ready.wait(), READY_TIMEOUT)
    except TimeoutError:
        raise StoreError(
            f"{name} is not running (it did not start within {READY_TIMEOUT:g}s)", store=name
        ) from None


def _is_snapshot(row: Record) -> bool:
    snapshot_kinds = (
        EventType.SNAPSHOT_CREATED,
        EventType.SNAPSHOT_COMPLETED,
        EventType.SNAPSHOT_FAILED,
    )
    return row.get("eventType") in snapshot_kinds and str(row.get("event")).endswith(".snapshot")


def _storable(key: Any, value: Any) -> bool:
    try:
        check_json("meta", {key: value})
    except InvalidInput:
        return False
    return True
