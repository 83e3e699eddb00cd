"""Conformance cases for a table's meta values and the locking rule core relies on (part of
:class:`~moleculerpy_cqrs.testing.conformance.AdapterConformance`).

The rule, as :class:`~moleculerpy_cqrs.stores.ports.Checkpoints` writes it: every write to a
table, of rows or of meta, takes the table's write lock, and ``get_meta_for_update`` takes it
before it reads; inside a transaction it is held until the transaction ends. Readers never
wait for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.testing.conformance_base import AdapterCase, doomed, outside, promptly


class MetaCases(AdapterCase):
    @pytest.mark.parametrize(
        "value",
        [0, 17, -2.5, "text", True, [1, "two"], {"nested": {"ü": ["😀", None]}}, 2**70],
    )
    async def test_set_then_get(self, value: Any) -> None:
        a = await self.open()
        assert await a.get_meta("k") is None
        await a.set_meta("k", value)
        assert await a.get_meta("k") == value

    async def test_overwrite_and_delete(self) -> None:
        a = await self.open()
        await a.set_meta("checkpoint", 1)
        await a.set_meta("checkpoint", 2)
        await a.set_meta("other", "x")
        assert await a.get_meta("checkpoint") == 2
        await a.set_meta("checkpoint", None)
        assert await a.get_meta("checkpoint") is None
        assert await a.get_meta("other") == "x"

    async def test_meta_belongs_to_its_table(self) -> None:
        items = await self.open()
        log = await self.open_sibling(items, "items_log")
        await items.set_meta("k", "items")
        await log.set_meta("k", "log")
        assert (await items.get_meta("k"), await log.get_meta("k")) == ("items", "log")

    async def test_meta_joins_the_transaction(self) -> None:
        a = await self.open()
        await a.set_meta("checkpoint", 1)
        async with doomed(a):
            await a.insert({"name": "x"})
            await a.set_meta("checkpoint", 2)
            assert await a.get_meta("checkpoint") == 2
        assert await a.get_meta("checkpoint") == 1
        async with a.transaction():
            await a.insert({"name": "y"})
            await a.set_meta("checkpoint", 3)
        assert (await a.get_meta("checkpoint"), await a.count()) == (3, 1)

    @pytest.mark.parametrize("key", ["", 7, None, "a\x00b"])
    async def test_a_bad_meta_key_is_refused_by_every_meta_method(self, key: Any) -> None:
        a = await self.open()
        for call in (a.get_meta, a.get_meta_for_update, lambda k: a.set_meta(k, 1)):
            with pytest.raises(InvalidInput):
                await call(key)

    @pytest.mark.parametrize(("key", "value"), [("k", {1, 2}), ("k", float("nan")), ("", 1)])
    async def test_bad_meta_is_refused(self, key: Any, value: Any) -> None:
        a = await self.open()
        with pytest.raises(InvalidInput):
            await a.set_meta(key, value)

    async def ready_for_two(self, a: Adapter) -> Adapter:
        """``a``, with what two writers at once need made ready (a pool's second connection):
        a writer below must wait for the lock, if at all, not for its connection."""

        async def unit() -> None:
            async with a.transaction():
                await a.count()
                await a.count()

        async def both() -> None:
            await asyncio.gather(outside(unit()), outside(unit()))

        await promptly(both())
        return a

    async def wait_long(self, a: Adapter) -> None:
        """Time enough for an outside write that does not wait for the lock to finish."""
        for _ in range(20):
            await self.let_others_run(a)

    async def test_a_meta_write_holds_the_tables_write_lock_until_the_commit(self) -> None:
        a = await self.ready_for_two(await self.open())
        async with a.transaction():
            await a.set_meta("checkpoint", 1)  # the transaction's only write
            row_writer = outside(a.insert({"name": "outside"}))
            meta_writer = outside(a.set_meta("other", "outside"))
            await self.wait_long(a)
            assert not row_writer.done()
            assert not meta_writer.done()
        await promptly(row_writer)
        await promptly(meta_writer)
        assert (await a.get_meta("checkpoint"), await a.get_meta("other")) == (1, "outside")

    async def test_get_meta_for_update_holds_the_lock_until_the_commit(self) -> None:
        a = await self.ready_for_two(await self.open())
        await a.set_meta("checkpoint", 1)
        async with a.transaction():
            assert await a.get_meta_for_update("checkpoint") == 1  # a read, and the lock
            overtaker = outside(a.set_meta("checkpoint", 5))
            await self.wait_long(a)
            assert not overtaker.done()
            await a.set_meta("checkpoint", 2)
        await promptly(overtaker)
        assert await a.get_meta("checkpoint") == 5  # written after ours, never before

    async def test_readers_of_meta_do_not_wait_for_the_lock(self) -> None:
        a = await self.open()
        await a.set_meta("checkpoint", 1)
        async with a.transaction():
            await a.get_meta_for_update("checkpoint")
            await a.set_meta("checkpoint", 2)
            reader = outside(a.get_meta("checkpoint"))
            if self.readers_wait_for_writers:
                await self.let_others_run(a)
                assert not reader.done()
            else:
                assert await promptly(reader) == 1  # the committed value
        assert await promptly(reader) in (1, 2)
