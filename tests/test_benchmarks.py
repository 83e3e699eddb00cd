"""``benchmarks/run`` still works: its scenarios for this project and the raw driver, at tiny
sizes, on real SQLite files, and the table built from their figures. No speed is asserted; the
eventsourcing subject needs the ``bench`` extra, which the test environment does not install.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from benchmarks import bench_ours as ours
from benchmarks import bench_raw as raw
from benchmarks import harness, paired
from benchmarks._common import table

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.broker import compat
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.nats_server import NatsServer


async def test_benchmark_scenarios_run_and_fill_the_table(tmp_path: Path) -> None:
    def folder(name: str) -> dict[str, Any]:
        return {"kind": "sqlite", "dir": str(tmp_path / name)}

    r: dict[str, dict[str, Any]] = {}
    for callers in (1, 64):
        for dispatch in (True, False):
            key = f"ours.appends.{callers}.{'on' if dispatch else 'off'}"
            r[key] = await ours.appends(
                stores.sqlite(tmp_path / key), callers, dispatch, seconds=0.2
            )
            assert r[key]["events"] > 0
            assert r[key]["p99_ms"] > 0
        r[f"ours.keyed.{callers}"] = await ours.appends(
            stores.sqlite(tmp_path / f"keyed{callers}"), callers, True, 0.2, keyed=True
        )
        r[f"raw.appends.{callers}"] = raw.appends(folder(f"raw{callers}"), callers, 0.1)
        assert r[f"raw.appends.{callers}"]["events"] >= callers

    large = stores.sqlite(tmp_path / "large")
    r["ours.keyed_fill"] = await ours.prefill_keyed(large, 25_000)
    assert r["ours.keyed_fill"]["events"] == 25_000
    for callers in (1, 64):
        r[f"ours.keyed_empty.{callers}"] = r[f"ours.keyed.{callers}"]
        r[f"ours.keyed_large.{callers}"] = await ours.appends(
            large, callers, True, 0.2, keyed=True, key_prefix=f"c{callers}"
        )
        assert r[f"ours.keyed_large.{callers}"]["events"] > 0

    log = stores.sqlite(tmp_path / "log")
    r["ours.prefill"] = await ours.prefill(log, 60)
    assert r["ours.prefill"]["events"] == 60
    for shape in ("create", "summary"):
        for as_action in (True, False):
            key = f"ours.catch_up.{shape}.{'action' if as_action else 'callable'}"
            r[key] = await ours.catch_up(log, shape, as_action, head=60, cap=60)
            assert r[key]["events"] == 60, key
            assert r[key]["complete"], key
            assert r[key]["correct"], f"{key}: the aggregate does not add up"
        r[f"raw.catch_up.{shape}"] = raw.catch_up(folder(f"raw_{shape}"), shape, 2500)
        assert r[f"raw.catch_up.{shape}"]["correct"]
    r["ours.replay"] = await ours.replay(log, head=60, cap=60)
    assert r["ours.replay"]["events"] == 60
    assert r["ours.replay"]["complete"]

    pairs = await ours.upcast_pairs(
        log, 60, [stores.sqlite(tmp_path / f"dispatch{i}") for i in range(4)], 40, 60, 2
    )
    sides = ("with", "without")
    assert all(run["correct"] for side in sides for run in pairs["catch_up"][side])
    assert all(run["heard"] == 40 for side in sides for run in pairs["dispatch"][side])
    r.update(harness.upcast_results(pairs))
    for job in ("catch_up", "dispatch"):
        ratios = harness.upcast_shares(r, job)
        assert len(ratios) == 2, job
        assert all(ratio > 0 for ratio in ratios), job
        # Pair by pair: each pair's run with the step over its run without.
        each = zip(pairs[job]["with"], pairs[job]["without"], strict=True)
        assert ratios == pytest.approx([a["per_second"] / b["per_second"] for a, b in each]), job
    r["ours.rebuild"] = await ours.rebuild(log, head=60)
    assert r["ours.rebuild"]["reads_failed"] == 0
    assert r["ours.rebuild"]["rebuild_seconds"] > 0

    with NatsServer() as nats:
        for shape, _ in harness.ELSEWHERE:
            for where in ("local", "remote"):
                key = f"ours.elsewhere.{shape}.{where}"
                async with running_broker(transporter=nats.url, node_id="summarizer") as node:
                    if where == "remote":
                        compat.install(node)
                        name = ours.remote_aggregate_name(shape, "remote")
                        await node.register(ours.summarizer_service(shape, name))
                    r[key] = await ours.catch_up_over_nats(log, shape, where, nats.url, 60, 60)
                assert r[key]["complete"], key
                assert r[key]["correct"], key

    r["ours.sustained"] = await ours.sustained(stores.sqlite(tmp_path / "load"), 8, 0.3)
    assert r["ours.sustained"]["projector_lag_events"] >= 0
    assert r["ours.sustained"]["dispatcher_lag_events"] is not None
    r["ours.ack_visible"] = await ours.ack_to_visible(stores.sqlite(tmp_path / "ack"), 100, 0.3)
    assert r["ours.ack_visible"]["events"] == 30

    sizes = dataclasses.replace(harness.QUICK, entity_rows=(50, 300), entity_events=120)
    for count in sizes.entity_rows:
        key = f"ours.per_entity.{count}"
        r[key] = await ours.per_entity(stores.sqlite(tmp_path / key), count, 120, cap=60)
        assert r[key]["complete"], key
        assert r[key]["correct"], f"{key}: the balances do not add up"
        r[f"raw.per_entity.{count}"] = raw.per_entity(folder(f"raw_entity{count}"), count, 120)
        assert r[f"raw.per_entity.{count}"]["correct"]

    rows = harness.build_rows("sqlite", r, sizes)
    lines = table(["scenario", *"abcdefg"], [row.cells() for row in rows])
    text = "\n".join(lines)
    assert "catch-up 60 ev, read-then-update, callable" in text
    assert "version-bump rebuild 60 ev, as a share of replay" in text
    assert "ack -> visible p99" in text
    assert "dispatch 60 ev, one upcast step, as a share of none (median of 2 pairs)" in text
    assert "per-entity 300 rows, 120 deposits" in text
    assert "appends with idempotency keys, 64 callers" in text
    assert "keyed appends into a log of 25,000, 1 caller" in text
    assert "sustained: dispatcher lag" in text
    assert "transformation on another node over NATS: read-then-update, no key" in text
    assert [r.scenario for r in rows if r.ours is None and not r.scenario.startswith("peak")] == []


def test_entity_rows_are_read_as_a_list_of_positive_counts() -> None:
    assert harness.row_counts("1000,1000000") == (1_000, 1_000_000)
    for bad in ("", "1000,x", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            harness.row_counts(bad)


async def test_the_paired_keyed_benchmark_runs(tmp_path: Path) -> None:
    log = stores.sqlite(tmp_path / "large")
    await ours.prefill_keyed(log, 500)
    for mode, factories in (("keys", [log]), ("large", [stores.sqlite(tmp_path / "empty"), log])):
        rates = await paired.measure(factories, mode, callers=4, pairs=2, window=0.1)
        assert [len(v) for v in rates.values()] == [2, 2], mode
        assert all(rate > 0 for v in rates.values() for rate in v), mode
