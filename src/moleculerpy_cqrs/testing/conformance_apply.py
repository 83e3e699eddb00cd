"""Conformance cases for :meth:`Adapter.apply`, the projector's batch write (part of
:class:`~moleculerpy_cqrs.testing.conformance.AdapterConformance`).

Every projector batch goes through it: rows with ids the caller chose, changes to rows it read,
its dead letters in a sibling table, and the checkpoint moved by compare-and-set, all in one
transaction. Each case checks that every backend answers alike, and that a refused batch leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moleculerpy_cqrs.errors import ConflictError, StoreError
from moleculerpy_cqrs.stores.base import Adapter, Changes, MetaMoved
from moleculerpy_cqrs.testing.conformance_base import (
    LOG_FIELDS,
    AdapterCase,
    doomed,
    outside,
    promptly,
)

FIELDS = {"k": "string", "n": "integer"}


def row(entity_id: int | None = None, **values: Any) -> dict[str, Any]:
    """A whole row as a batch writes it: every field, null unless given."""
    out: dict[str, Any] = {"k": None, "n": None, **values}
    return out if entity_id is None else {"id": entity_id, **out}


class ApplyCases(AdapterCase):
    async def table(self) -> tuple[Adapter, Adapter]:
        a = await self.open("rows", FIELDS)
        log = await self.open_sibling(a, "rows_dead", LOG_FIELDS)
        return a, log

    @staticmethod
    async def state(a: Adapter, log: Adapter) -> tuple[Any, ...]:
        return (await a.find(), await log.find(), await a.get_meta("checkpoint"))

    async def test_apply_writes_inserts_updates_deletes_meta_and_moves_the_checkpoint(
        self,
    ) -> None:
        a, log = await self.table()
        kept, gone = await a.insert_many([row(k="kept", n=1), row(k="gone")])
        changes = Changes(
            inserts=[row(kept["id"] + 10, k="new")],
            updates={kept["id"]: {"n": 2}},
            deletes=[gone["id"]],
            meta={"lastId": kept["id"] + 10},
        )
        also = [(log, Changes(inserts=[{"event": "dead", "payload": None}]))]
        await a.apply(changes, advance=("checkpoint", 0, 7), also=also)
        assert await a.find() == [
            {"id": kept["id"], "k": "kept", "n": 2},
            {"id": kept["id"] + 10, "k": "new", "n": None},
        ]
        assert [r["event"] for r in await log.find()] == ["dead"]
        assert await a.get_meta("checkpoint") == 7
        assert await a.get_meta("lastId") == kept["id"] + 10

    async def test_a_moved_checkpoint_refuses_the_batch_and_writes_nothing(self) -> None:
        a, log = await self.table()
        await a.apply(Changes(), advance=("checkpoint", 0, 5))
        before = await self.state(a, log)
        changes = Changes(inserts=[row(k="x")], meta={"lastId": 9})
        also = [(log, Changes(inserts=[{"event": "dead", "payload": None}]))]
        with pytest.raises(MetaMoved) as moved:
            await a.apply(changes, advance=("checkpoint", 0, 6), also=also)
        assert (moved.value.key, moved.value.stored, moved.value.expected) == ("checkpoint", 5, 0)
        assert await self.state(a, log) == before
        assert await a.get_meta("lastId") is None

    async def test_ids_chosen_by_the_caller_and_later_ids_past_them(self) -> None:
        a, _ = await self.table()
        await a.apply(Changes(inserts=[row(5, k="five"), row(3, k="three")]))
        assert [(r["id"], r["k"]) for r in await a.find()] == [(3, "three"), (5, "five")]
        fresh = await a.insert(row(k="fresh"))
        assert fresh["id"] > 5
        (appended,) = await a.append([row(k="appended")])
        assert appended["id"] > fresh["id"]

    async def test_inserting_an_id_that_exists_is_a_conflict_and_writes_nothing(self) -> None:
        a, log = await self.table()
        taken = await a.insert(row(k="taken"))
        before = await self.state(a, log)
        with pytest.raises(ConflictError) as refused:
            await a.apply(
                Changes(inserts=[row(taken["id"] + 1, k="ok"), row(taken["id"], k="again")]),
                advance=("checkpoint", 0, 1),
            )
        assert refused.value.data["field"] == "id"
        assert await self.state(a, log) == before

    async def test_an_update_of_a_missing_row_fails_the_batch_and_writes_nothing(self) -> None:
        a, log = await self.table()
        present = await a.insert(row(k="here", n=1))
        before = await self.state(a, log)
        changes = Changes(
            inserts=[row(k="new")],
            updates={present["id"]: {"n": 2}, present["id"] + 100: {"n": 3}},
        )
        also = [(log, Changes(inserts=[{"event": "dead", "payload": None}]))]
        with pytest.raises(StoreError, match="missing"):
            await a.apply(changes, advance=("checkpoint", 0, 1), also=also)
        assert await self.state(a, log) == before

    async def test_deleting_a_missing_row_is_no_error(self) -> None:
        a, _ = await self.table()
        present = await a.insert(row(k="here"))
        await a.apply(Changes(deletes=[present["id"], present["id"] + 100]))
        assert await a.count() == 0

    async def test_a_sibling_failure_rolls_the_whole_batch_back(self) -> None:
        a, log = await self.table()
        before = await self.state(a, log)
        also = [(log, Changes(updates={404: {"event": "nope"}}))]
        with pytest.raises(StoreError, match="missing"):
            await a.apply(Changes(inserts=[row(k="x")]), advance=("checkpoint", 0, 1), also=also)
        assert await self.state(a, log) == before

    async def test_apply_joins_an_enclosing_transaction(self) -> None:
        a, log = await self.table()
        async with doomed(a):
            await a.apply(Changes(inserts=[row(k="x")]), advance=("checkpoint", 0, 1))
            assert await a.count() == 1
        assert await self.state(a, log) == ([], [], None)

    async def test_get_meta_for_update_serialises_read_modify_write(self) -> None:
        a, _ = await self.table()

        async def bump() -> None:
            async with a.transaction():
                n = await a.get_meta_for_update("n")
                await self.let_others_run(a)  # another bump would read the same n here
                await a.set_meta("n", (n or 0) + 1)

        async def all_bumps() -> None:
            await asyncio.gather(*(outside(bump()) for _ in range(5)))

        await promptly(all_bumps())
        assert await a.get_meta("n") == 5
