"""Services that expose a store through the broker (moleculer-db compatible actions).

Read actions answer from the projector's open batch when called from one of its
transformations (see :mod:`moleculerpy_cqrs.core.joins`), so a transformation sees every
earlier event's effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moleculerpy import Context, action

from moleculerpy_cqrs.core.joins import OpenBatches
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.errors import InvalidInput, ReadOnlyAggregateError
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.populate import PopulateRule, Populator


def params_of(ctx: Context) -> dict[str, Any]:
    """An action's params: an object, or none at all (then ``{}``)."""
    params = ctx.params
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"params must be an object, got {type(params).__name__}")
    return params


class _StoreBase:
    """What the action mixins below need from the service they are mixed into."""

    name: str
    port: BrokerPort

    @property
    def adapter(self) -> Adapter:
        raise NotImplementedError

    async def wait_ready(self) -> None:
        """Return once the store is connected (bounded); see ``until_ready``."""
        raise NotImplementedError

    def populate_rules(self) -> Mapping[str, PopulateRule]:
        """moleculer-db's ``settings.populates`` of this store (none: ``populate`` is refused)."""
        return {}

    @property
    def batches(self) -> OpenBatches | None:
        """The projector's open batches, for a store that a projector writes."""
        return None

    async def _run(self, ctx: Context, action: str) -> Any:
        """Run a store action, on the projector's open batch when called from one."""
        await self.wait_ready()
        view = self.batches.view_for(ctx.meta) if self.batches is not None else None
        if view is not None and action == "find":
            found = view.find_by_key(ctx.params)  # a prefetched key's rows: no parsing
            if found is not None:
                return found
        # moleculer-db's populate calls the related services from the caller's context.
        rules = self.populate_rules()
        populator = Populator(rules, ctx.call) if rules else None
        actions = StoreActions(view or self.adapter, populator=populator)
        return await getattr(actions, action)(ctx.params)

    async def _announce(self, what: str, payload: dict[str, Any]) -> None:
        await self.port.broadcast(f"{self.name}.{what}", payload)


class ReadActions(_StoreBase):
    @action(name="find")
    async def find_action(self, ctx: Context) -> Any:
        return await self._run(ctx, "find")

    @action(name="count")
    async def count_action(self, ctx: Context) -> Any:
        return await self._run(ctx, "count")

    @action(name="list")
    async def list_action(self, ctx: Context) -> Any:
        return await self._run(ctx, "list_page")

    @action(name="get")
    async def get_action(self, ctx: Context) -> Any:
        return await self._run(ctx, "get")


class WriteActions(_StoreBase):
    """moleculer-db's write actions. Only served when ``write_actions`` is true: otherwise
    every call is refused with :class:`ReadOnlyAggregateError` (405) before its params are
    looked at, since rows written here are not events and a replay drops them."""

    write_actions: bool  # set by the service's __init__ (MoleculerPy keeps it in _extra)

    def _writable(self, action_name: str) -> None:
        if not self.write_actions:
            raise ReadOnlyAggregateError(self.name, action_name)

    @action(name="create")
    async def create_action(self, ctx: Context) -> Any:
        self._writable("create")
        row = await self._run(ctx, "create")
        await self._announce("created", row)
        return row

    @action(name="insert")
    async def insert_action(self, ctx: Context) -> Any:
        self._writable("insert")
        rows = await self._run(ctx, "insert")
        await self._announce("created", {"rows": rows} if isinstance(rows, list) else rows)
        return rows

    @action(name="update")
    async def update_action(self, ctx: Context) -> Any:
        self._writable("update")
        row = await self._run(ctx, "update")
        await self._announce("updated", row)
        return row

    @action(name="remove")
    async def remove_action(self, ctx: Context) -> Any:
        self._writable("remove")
        row = await self._run(ctx, "remove")
        await self._announce("removed", row)
        return row
