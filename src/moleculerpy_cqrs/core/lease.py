"""A lease in the store's meta: which node runs a dispatcher or a projector right now.

Several nodes may serve one event store or aggregate on a shared database; only the holder of
the lease works, the others stand by and take over once it expires (the holder died or went
idle). The holder renews it when half its time is gone, and only while it has work, so an idle
cluster costs one small transaction per node per ``ttl``. Expiry uses wall clocks: nodes'
clocks must agree to well within ``ttl``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

from moleculerpy_cqrs.stores.ports import Checkpoints

DEFAULT_TTL: Final = 5.0


@dataclass(frozen=True)
class Grant:
    """The answer of :meth:`Lease.acquire`."""

    held: bool
    fresh: bool = False  # newly taken: state kept in memory may be stale, reload it
    retry_in: float = 0.0  # when not held: seconds until the holder's lease ends


class Lease:
    def __init__(self, adapter: Checkpoints, key: str, node: str, ttl: float = DEFAULT_TTL) -> None:
        self.adapter = adapter
        self.key = key
        self.owner = f"{node}/{secrets.token_hex(4)}"
        self.ttl = ttl
        self._until = 0.0  # when our own lease ends, as far as we know

    async def acquire(self) -> Grant:
        now = time.time()
        if self._until - now > self.ttl / 2:
            return Grant(held=True)
        async with self.adapter.transaction():
            # Read under the table's write lock: no other node can take the lease between
            # this read and our write.
            current = await self.adapter.get_meta_for_update(self.key)
            if (
                isinstance(current, dict)
                and current.get("owner") != self.owner
                and float(current.get("until", 0)) > now
            ):
                self._until = 0.0
                return Grant(held=False, retry_in=float(current["until"]) - now)
            fresh = not (isinstance(current, dict) and current.get("owner") == self.owner)
            fresh = fresh or self._until < now
            self._until = now + self.ttl
            await self.adapter.set_meta(self.key, {"owner": self.owner, "until": self._until})
        return Grant(held=True, fresh=fresh)

    def forget(self) -> None:
        """Act as if the lease had lapsed: the next :meth:`acquire` writes it again instead of
        trusting what it remembered (after the aggregate's meta was rewritten by a restore, or
        swapped for a shadow's, which held no lease)."""
        self._until = 0.0

    async def release(self) -> None:
        """Give the lease up (a clean stop), so another node takes over at once."""
        if self._until <= time.time():
            return
        self._until = 0.0
        async with self.adapter.transaction():
            current = await self.adapter.get_meta_for_update(self.key)
            if isinstance(current, dict) and current.get("owner") == self.owner:
                await self.adapter.set_meta(self.key, None)

    async def holder(self) -> dict[str, Any] | None:
        """Who holds the lease, for status: the holder's node id, whether it is this very
        lease, and the seconds left (negative once it lapsed: the holder went idle, and the
        next node with work takes it). None when nobody took it or it was given up."""
        current = await self.adapter.get_meta(self.key)
        if not isinstance(current, dict) or not current.get("owner"):
            return None
        owner = str(current["owner"])
        return {
            "node": owner.rpartition("/")[0] or owner,
            "mine": owner == self.owner,
            "expiresIn": round(float(current.get("until", 0)) - time.time(), 3),
        }
