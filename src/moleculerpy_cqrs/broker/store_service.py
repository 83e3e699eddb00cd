"""Services that expose a store through the broker (moleculer-db compatible actions).

Read actions join the projector's open batch when called from a transformation (see
:mod:`moleculerpy_cqrs.core.joins`), so a transformation sees every earlier event's effect.
"""

from __future__ import annotations

from typing import Any

from moleculerpy import Context, action

from moleculerpy_cqrs.core import joins
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.stores.actions import StoreActions


class _StoreBase:
    """What the action mixins below need from the service they are mixed into."""

    name: str
    port: BrokerPort

    @property
    def store(self) -> StoreActions:
        raise NotImplementedError

    async def _announce(self, what: str, payload: dict[str, Any]) -> None:
        await self.port.broadcast(f"{self.name}.{what}", payload)


class ReadActions(_StoreBase):
    @action(name="find")
    async def find_action(self, ctx: Context) -> Any:
        return await joins.run_joined(ctx.meta, lambda: self.store.find(ctx.params))

    @action(name="count")
    async def count_action(self, ctx: Context) -> Any:
        return await joins.run_joined(ctx.meta, lambda: self.store.count(ctx.params))

    @action(name="list")
    async def list_action(self, ctx: Context) -> Any:
        return await joins.run_joined(ctx.meta, lambda: self.store.list_page(ctx.params))

    @action(name="get")
    async def get_action(self, ctx: Context) -> Any:
        return await joins.run_joined(ctx.meta, lambda: self.store.get(ctx.params))


class WriteActions(_StoreBase):
    @action(name="create")
    async def create_action(self, ctx: Context) -> Any:
        row = await joins.run_joined(ctx.meta, lambda: self.store.create(ctx.params))
        await self._announce("created", row)
        return row

    @action(name="insert")
    async def insert_action(self, ctx: Context) -> Any:
        rows = await joins.run_joined(ctx.meta, lambda: self.store.insert(ctx.params))
        await self._announce("created", {"rows": rows} if isinstance(rows, list) else rows)
        return rows

    @action(name="update")
    async def update_action(self, ctx: Context) -> Any:
        row = await joins.run_joined(ctx.meta, lambda: self.store.update(ctx.params))
        await self._announce("updated", row)
        return row

    @action(name="remove")
    async def remove_action(self, ctx: Context) -> Any:
        row = await joins.run_joined(ctx.meta, lambda: self.store.remove(ctx.params))
        await self._announce("removed", row)
        return row
