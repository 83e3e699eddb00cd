"""What a serving node keeps for a serial session (``broker/remote_kept.py``) answers what the
projector's batch answers after the same answers are applied: every find and key's rows it
still keeps are the batch's own, row for row (SQLite file in memory, the projector's
``apply_result``)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.broker.remote_kept import Kept
from moleculerpy_cqrs.core.batch import BatchView, IdCounter
from moleculerpy_cqrs.core.port import KeyRows
from moleculerpy_cqrs.core.projector import apply_result
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.fields import ID
from moleculerpy_cqrs.stores.query import Compare, Query, parse_find

FIELDS: dict[str, Any] = {"k": "string", "n": "integer", "eventId": "integer"}
keys = st.sampled_from(["a", "b", "c"])
finds: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.fixed_dictionaries({"query": st.fixed_dictionaries({"k": keys})}),
    st.fixed_dictionaries({"query": st.fixed_dictionaries({"n": st.integers(0, 3)})}),
    st.fixed_dictionaries(
        {"query": st.fixed_dictionaries({"n": st.fixed_dictionaries({">": st.integers(0, 3)})})}
    ),
    st.fixed_dictionaries({"query": st.fixed_dictionaries({"k": keys, "n": st.integers(0, 3)})}),
    st.just({}),
)
small = st.integers(0, 3)
row = st.fixed_dictionaries({"k": keys, "n": small})
answers: st.SearchStrategy[tuple[str, int | None, dict[str, Any]]] = st.one_of(
    st.tuples(st.just("update"), st.integers(1, 8), st.fixed_dictionaries({"n": small})),
    st.tuples(st.just("update"), st.integers(1, 8), st.fixed_dictionaries({"k": keys})),
    st.tuples(st.just("update"), st.just(None), row),  # no id: a new row
    st.tuples(st.just("create"), st.just(None), row),
    st.tuples(st.just("remove"), st.integers(1, 8), st.just({})),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(st.tuples(keys, st.integers(0, 3)), min_size=1, max_size=6),
    kept_finds=st.lists(finds, max_size=4),
    kept_keys=st.lists(keys, max_size=3),
    steps=st.lists(st.tuples(answers, st.lists(finds, max_size=2)), max_size=8),
)
@example(  # a kept key's row moves to another key
    initial=[("a", 0)], kept_finds=[], kept_keys=["a", "b"], steps=[(("update", 1, {"k": "b"}), [])]
)
def test_what_a_session_keeps_is_what_the_batch_holds(
    initial: list[tuple[str, int]],
    kept_finds: list[dict[str, Any]],
    kept_keys: list[str],
    steps: list[tuple[tuple[str, int | None, dict[str, Any]], list[dict[str, Any]]]],
) -> None:
    async def check() -> None:
        async with stores.sqlite(":memory:")("t", FIELDS) as table:
            await table.insert_many([{"k": k, "n": n, "eventId": 0} for k, n in initial])
            view = BatchView(table, IdCounter())
            actions = StoreActions(view)
            kept = Kept(FIELDS)
            names: dict[str, dict[str, Any]] = {}

            async def keep(params: dict[str, Any]) -> None:
                name = repr(sorted(params.items()))
                names[name] = params
                rows = await actions.find(params)
                kept.keep_find(name, parse_find(FIELDS, params).where, rows)

            for params in kept_finds:
                await keep(params)
            for key in kept_keys:
                rows = await view.find(Query(where=Compare("k", "=", key)))
                kept.key_rows(KeyRows("k", key, rows))
            event_id = 0
            for (kind, row_id, fields), more in steps:
                event_id += 1
                answer = fields if row_id is None else {ID: row_id, **fields}
                if kind == "update" and row_id is not None and not await view.get(row_id):
                    continue  # the projector would refuse it (a missing row)
                if kind == "remove" and row_id is not None and not await view.get(row_id):
                    continue
                await apply_result(view, kind, answer, event_id)  # type: ignore[arg-type]
                kept.absorb(kind, answer, event_id)
                for name, params in names.items():
                    got = kept.find(name)
                    if got is not None:
                        assert got == await actions.find(params), (name, answer)
                for key in ("a", "b", "c"):
                    held = kept.kept_key("k", key)
                    if held is not None:
                        now = await view.find(Query(where=Compare("k", "=", key)))
                        assert sorted(held, key=lambda r: r[ID]) == now, (key, answer)
                for params in more:  # kept later in the session
                    await keep(params)

    asyncio.run(check())
