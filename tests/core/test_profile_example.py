"""The seed's profile example end to end: the summary equals the counts of the inputs.

The transformation reads its own aggregate (``profileSummaryAggregate.find``) for every event,
so with large batches this checks invariant 4: a transformation sees the effect of every
earlier event, also of those in its own (uncommitted) batch.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore

PROFILES = 10_000


def expected(profiles: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    total: Counter[str] = Counter()
    married: Counter[str] = Counter()
    students: Counter[str] = Counter()
    for p in profiles:
        total[p["country"]] += 1
        married[p["country"]] += p["married"]
        students[p["country"]] += p["student"]
    return {c: (total[c], married[c], students[c]) for c in total}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 1000])
async def test_summary_equals_the_inputs(make_store: MakeStore, batch_size: int) -> None:
    rng = random.Random(batch_size)
    profiles = [random_profile(rng) for _ in range(PROFILES)]
    _, summary, service = profile.build(make_store(), batch_size=batch_size)
    async with running_broker(service()) as broker:
        pending = list(profiles)

        async def sender() -> None:
            while pending:
                await broker.call("profile.update", pending.pop())

        await asyncio.gather(*(sender() for _ in range(50)))
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 240)
        rows = await broker.call("profileSummaryAggregate.find", {})
        status = await broker.call("profileSummaryAggregate.status", {})
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)
    assert status["checkpoint"] == status["head"] == PROFILES
    assert status["deadLetters"] == 0
