"""The dispatcher: emits every stored command, in position order, to whoever subscribes.

Status per event: 0 created → 2 complete; a delivery that fails is retried with backoff
(4 retrying) and marked 3 failed after ``max_attempts``. Events are emitted as soon as they are
read (with status 1, processing, in the emitted payload); the bookkeeping — their statuses and
the position of the last settled event — is written afterwards in one transaction per
``settle_interval`` seconds (or per 10,000 events, whichever comes first), so the dispatcher
costs the appenders about ten commits a second, whatever the load, not one per event. After
a crash the events past the last settled position are delivered again (at-least-once).
Appends wake it; idle, it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from moleculerpy_cqrs.core.lease import Lease
from moleculerpy_cqrs.core.log import Wakeup
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.core.records import ORIGIN_KEY, EventType, Status, delivered, now_ms
from moleculerpy_cqrs.core.upcast import Upcasters, UpcastFailed
from moleculerpy_cqrs.stores.fields import Record
from moleculerpy_cqrs.stores.ports import Changes, EventTable

CURSOR_KEY: Final = "dispatch.cursor"
SETTLE_INTERVAL: Final = 0.1
SETTLE_MOST: Final = 10_000  # delivered events held unsettled at most (memory, redelivery)
LINGER: Final = 0.005  # after a wake-up from idle: more appends make one read
log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        adapter: EventTable,
        port: BrokerPort,
        *,
        batch_size: int = 100,
        max_attempts: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        lease: Lease | None = None,
        settle_interval: float = SETTLE_INTERVAL,
        linger: float = LINGER,
        upcasters: Upcasters | None = None,
    ) -> None:
        self._upcasters = upcasters or Upcasters("")
        self.settle_interval = settle_interval
        self.linger = linger
        self._settled: dict[int, int] = {}  # delivered, not yet written: id -> status
        self._oldest: float | None = None  # when the first of those was delivered
        self.settled = 0  # the position written as settled
        self.settlements = 0  # transactions that wrote statuses
        self._adapter = adapter
        self._lease = lease
        self.standby = False
        self._port = port
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._wakeup = Wakeup()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._progress = asyncio.Condition()
        self.cursor = 0
        self.delivered = 0
        self.failed = 0
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wakeup.wake()

    def start(self) -> None:
        if not self.running:
            self._stopping.clear()
            self._wakeup.wake()
            self._task = asyncio.create_task(self._run(), name="cqrs-dispatcher")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop after the batch in flight is settled (cancelled after ``grace`` seconds)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wakeup.wake()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._lease is not None:
            try:
                await self._lease.release()
            except Exception:
                log.exception("dispatcher: could not release its lease")

    async def _run(self) -> None:
        self.cursor = self.settled = int(await self._adapter.get_meta(CURSOR_KEY) or 0)
        try:
            while not self._stopping.is_set():
                self._wakeup.arm()
                if self._lease is not None:
                    grant = await self._lease.acquire()
                    self.standby = not grant.held
                    if not grant.held:  # another node dispatches: wait for its lease to end
                        self._settled, self._oldest = {}, None  # it delivers those again
                        await self._pause(grant.retry_in + 0.01)
                        continue
                    if grant.fresh:
                        await self._settle()
                        self.cursor = self.settled = int(
                            await self._adapter.get_meta(CURSOR_KEY) or 0
                        )
                try:
                    rows = await self._adapter.read_after(self.cursor, max(self.batch_size, 1))
                    if rows:
                        await self._dispatch(rows)
                    if self._due(idle=not rows):
                        await self._settle()
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # a store failure: try again later
                    message = f"{type(error).__name__}: {error}"
                    if message != self.last_error:  # once per distinct failure, not per retry
                        log.exception("dispatcher: store failure, retrying")
                    self.last_error = message
                    await self._pause(self.backoff)
                    continue
                if not rows:
                    await self._idle()
        finally:
            if self._settled and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await self._settle()

    def _due(self, *, idle: bool) -> bool:
        if not self._settled:
            return False
        if len(self._settled) >= SETTLE_MOST:
            return True
        assert self._oldest is not None
        return time.monotonic() - self._oldest >= self.settle_interval

    async def _idle(self) -> None:
        """Wait for new events (then ``linger`` a moment, so that one read takes the appends
        of several commits); settle what was delivered once its interval is over."""
        if not self._settled:
            await self._wakeup.wait()
            await asyncio.sleep(self.linger)
            return
        assert self._oldest is not None
        left = self._oldest + self.settle_interval - time.monotonic()
        try:
            await asyncio.wait_for(self._wakeup.wait(), max(left, 0))
        except TimeoutError:
            await self._settle()
            return
        await asyncio.sleep(self.linger)

    async def wait_settled(self, position: int) -> int:
        """Wait until every event up to ``position`` is settled (complete or failed) and
        written so."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.settled >= position)
        return self.settled

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless asked to stop meanwhile; answers whether a stop was asked."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _dispatch(self, rows: list[Record]) -> None:
        commands = [
            r
            for r in rows
            if r["eventType"] == EventType.COMMAND
            and r["status"] not in (Status.COMPLETE, Status.FAILED)
        ]
        for row in commands:
            self._settled[row["id"]] = int(await self._deliver_read(row, len(commands)))
        if self._oldest is None:
            self._oldest = time.monotonic()
        self.cursor = rows[-1]["id"]
        self._settled.setdefault(self.cursor, -1)  # -1: only the cursor moves

    async def _settle(self) -> None:
        """Write the statuses of the events delivered since the last time, and the cursor,
        in one transaction."""
        if not self._settled:
            return
        settled, cursor = self._settled, self.cursor
        self._settled, self._oldest = {}, None
        now = now_ms()
        updates = {
            i: {"status": status, "updated": now} for i, status in settled.items() if status >= 0
        }
        try:
            await self._adapter.apply(Changes(updates=updates, meta={CURSOR_KEY: cursor}))
        except BaseException:
            self._settled = {**settled, **self._settled}  # try again with the next batch
            self._oldest = time.monotonic()
            raise
        self.settlements += 1
        async with self._progress:
            self.settled = cursor
            self._progress.notify_all()

    async def _deliver_read(self, row: Record, batch_size: int) -> Status:
        """Deliver a stored event as it is read now (the upcasters' choke point): as one
        event, as each of its pieces, or not at all when it cannot be upcast (it is marked
        failed with the upcaster's error; the dispatcher goes on)."""
        try:
            pieces = self._upcasters.read(row)
        except UpcastFailed as failed:
            self.last_error = str(failed)
            self.failed += 1
            await self._adapter.update(
                row["id"],
                {"status": int(Status.FAILED), "error": str(failed)[:2000], "updated": now_ms()},
            )
            return Status.FAILED
        status = Status.COMPLETE
        # Where each event comes from, so a subscriber storing it (map_event) can key it and
        # store a redelivery once: the store and position, and which piece of a split event.
        origin = f"{self._adapter.name}:{row['id']}"
        for n, piece in enumerate(pieces):
            where = origin if len(pieces) == 1 else f"{origin}#{n}"
            if await self._deliver(piece, batch_size, where) == Status.FAILED:
                status = Status.FAILED
        return status

    async def _deliver(self, row: Record, batch_size: int, origin: str) -> Status:
        payload = delivered({**row, "status": int(Status.PROCESSING)}, batch_size)
        meta = {**(row.get("meta") or {}), ORIGIN_KEY: origin}
        attempts = int(row.get("attempts") or 0)
        while True:
            attempts += 1
            try:
                await self._port.emit(row["event"], payload, meta=meta)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {error}"
                final = attempts >= self.max_attempts
                await self._adapter.update(
                    row["id"],
                    {
                        "status": int(Status.FAILED if final else Status.RETRYING),
                        "attempts": attempts,
                        "error": self.last_error[:2000],
                        "updated": now_ms(),
                    },
                )
                if final:
                    self.failed += 1
                    return Status.FAILED
                if await self._pause(min(self.backoff * 2 ** (attempts - 1), self.max_backoff)):
                    raise asyncio.CancelledError from None  # stopping: the row stays "retrying"
                continue
            self.delivered += 1
            if attempts > 1:
                await self._adapter.update(row["id"], {"attempts": attempts})
            return Status.COMPLETE
