"""``benchmarks/run``: this project beside ``eventsourcing`` 9.5.6 and the raw drivers.

    benchmarks/run [--quick] [--backend sqlite|postgres|all] [--out DIR] [--only GROUP ...]
                   [--entity-rows N,N] [--entity-events N]

Every subject runs each scenario in a process of its own (``benchmarks/subject.py``), one after
another, on a fresh database (a new folder, or a new PostgreSQL schema on a private server),
with the same durability: SQLite WAL ``synchronous=FULL`` (read back in each process),
PostgreSQL with fsync on. Prints the machine (fsync p50, load, cores, versions) and one table;
writes the figures as JSON and a PNG of the ratios to ``--out``. ``--only GROUP`` (repeatable)
runs only the jobs of the groups named (a prefix of: appends, keyed_large, catch_up, upcast,
rebuild, per_entity, elsewhere, load), and the jobs they need (the catch-up log), and prints only
their rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import fsync_latency, table  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.bench_ours import RemoteShape


@dataclass(frozen=True)
class Sizes:
    append_seconds: float
    catch_up_events: int
    catch_up_cap: float  # seconds: a slower subject is reported on how far it got
    sustained_seconds: float
    ack_seconds: float
    large_replay: int  # 0: skipped
    large_fill_cap: float
    large_cap: float
    rounds: int  # append runs per subject, interleaved; the best one counts (the box is shared)
    entity_rows: tuple[int, ...]  # per-entity read model: accounts filled before timing
    entity_events: int  # deposits applied (timed)
    entity_cap: float
    keyed_log: int  # events with idempotency keys already in the log for the large-log rows


QUICK = Sizes(3.0, 10_000, 20.0, 15.0, 5.0, 0, 0.0, 0.0, 1, (1_000, 20_000), 3_000, 20.0, 20_000)
FULL = Sizes(
    5.0,
    100_000,
    45.0,
    60.0,
    10.0,
    1_000_000,
    150.0,
    60.0,
    2,
    (1_000, 1_000_000),
    20_000,
    60.0,
    1_000_000,
)
ENTITY_TARGET_ROWS = 1_000_000  # the size the per-entity targets are set for


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- stores and jobs


class Stores:
    """Fresh databases for jobs: a folder each on SQLite, a schema each on PostgreSQL."""

    def __init__(self, backend: str, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.backend = backend
        self.workdir = workdir
        self.stack = stack
        self.count = 0
        self.dsn = ""
        self.server_version = ""
        if backend == "postgres":
            from moleculerpy_cqrs.testing.postgres_server import PostgresServer

            self.dsn = stack.enter_context(PostgresServer()).dsn
            import psycopg

            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            self.server_version = str(row[0]) if row else "?"

    def fresh(self, label: str) -> dict[str, Any]:
        self.count += 1
        name = f"{self.count:02d}_{label}"
        if self.backend == "sqlite":
            folder = self.workdir / name
            folder.mkdir()
            return {"kind": "sqlite", "dir": str(folder)}
        from psycopg.conninfo import conninfo_to_dict

        from moleculerpy_cqrs.testing.postgres_server import isolated_schema

        schema = self.stack.enter_context(isolated_schema(self.dsn, f"b{self.count:02d}"))
        info = conninfo_to_dict(self.dsn)
        return {
            "kind": "postgres",
            "dsn": self.dsn,
            "schema": schema,
            "host": str(info.get("host", "")),
            "port": str(info.get("port", "5432")),
            "user": str(info.get("user", "postgres")),
            "dbname": str(info.get("dbname", "postgres")),
        }


def start_job(
    subject: str, scenario: str, store: dict[str, Any], **params: Any
) -> subprocess.Popen[str]:
    job = {"subject": subject, "scenario": scenario, "store": store, "params": params}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "subject.py"), json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def result_of(proc: subprocess.Popen[str], stdin: str = "") -> dict[str, Any]:
    stdout, stderr = proc.communicate(stdin)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        say(f"  FAILED (exit {proc.returncode}):\n{tail}")
        return {"error": tail or f"exit {proc.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def run_job(subject: str, scenario: str, store: dict[str, Any], **params: Any) -> dict[str, Any]:
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    say(f"{subject:4} {scenario} {params} (load {load})")
    started = time.perf_counter()
    result = result_of(start_job(subject, scenario, store, **params))
    if "error" in result:
        return {**result, "load": load}
    result["load"] = load
    result["wall_seconds"] = time.perf_counter() - started
    shown = {k: v for k, v in result.items() if k in ("per_second", "p99_ms", "events")}
    say(f"  {json.dumps(shown, default=str)} [{result['durability']}]")
    return result


GROUPS = ("appends", "keyed_large", "catch_up", "upcast", "rebuild", "per_entity", "elsewhere",
          "load")  # fmt: skip


def measure(
    backend: str, sizes: Sizes, stores: Stores, only: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Every job of one backend (of the ``only`` groups, if given), in order; answers the
    results by job key."""
    r: dict[str, dict[str, Any]] = {}
    s = sizes
    sqlite_only = backend == "sqlite"

    def want(*groups: str) -> bool:
        return not only or any(g.startswith(o) for g in groups for o in only)

    # ---- appends
    def best(key: str, result: dict[str, Any]) -> None:
        rounds = [*r.get(key, {}).get("rounds", []), result]
        kept = max(rounds, key=lambda x: float(x.get("per_second") or 0.0))
        r[key] = {**kept, "rounds": rounds}

    for _ in range(s.rounds if want("appends") else 0):
        for callers in (1, 64):
            for dispatch in (True, False):
                key = f"ours.appends.{callers}.{'on' if dispatch else 'off'}"
                best(key, run_job(
                    "ours", "appends", stores.fresh("ours"), callers=callers,
                    dispatch=dispatch, seconds=s.append_seconds,
                ))  # fmt: skip
            # The same with an idempotency key per call, right after (the same load).
            best(f"ours.keyed.{callers}", run_job(
                "ours", "appends", stores.fresh("keyed"), callers=callers, dispatch=True,
                seconds=s.append_seconds, keyed=True,
            ))  # fmt: skip
            best(f"es.appends.{callers}", run_job(
                "es", "appends", stores.fresh(f"es{callers}"), threads=callers,
                seconds=s.append_seconds,
            ))  # fmt: skip
            best(f"raw.appends.{callers}", run_job(
                "raw", "appends", stores.fresh(f"raw{callers}"), per_transaction=callers,
                seconds=s.append_seconds,
            ))  # fmt: skip
    # ---- keyed appends into a log of s.keyed_log keyed events vs an empty log, back to back
    large = stores.fresh("keyed_large")
    if want("keyed_large"):
        r["ours.keyed_fill"] = run_job("ours", "prefill_keyed", large, count=s.keyed_log)
    for callers in (1, 64) if want("keyed_large") else ():
        r[f"ours.keyed_empty.{callers}"] = run_job(
            "ours", "appends", stores.fresh("keyed_empty"), callers=callers, dispatch=True,
            seconds=s.append_seconds, keyed=True,
        )  # fmt: skip
        r[f"ours.keyed_large.{callers}"] = run_job(
            "ours", "appends", large, callers=callers, dispatch=True,
            seconds=s.append_seconds, keyed=True, key_prefix=f"c{callers}",
        )  # fmt: skip
    # ---- catch-up: one log stored once, a new aggregate per variant
    log = stores.fresh("catchup")
    head = 0
    if want("catch_up", "upcast", "rebuild", "elsewhere"):
        filled = run_job("ours", "prefill", log, count=s.catch_up_events)
        r["ours.prefill"] = filled
        head = int(filled.get("events", 0))
    for shape in ("create", "summary") if want("catch_up") else ():
        for as_action in (True, False):
            key = f"ours.catch_up.{shape}.{'action' if as_action else 'callable'}"
            r[key] = run_job(
                "ours", "catch_up", log, shape=shape, as_action=as_action, head=head,
                cap=s.catch_up_cap,
            )  # fmt: skip
        r[f"es.catch_up.{shape}"] = run_job(
            "es", "catch_up", stores.fresh(f"es_{shape}"), shape=shape,
            count=s.catch_up_events, cap=s.catch_up_cap,
        )  # fmt: skip
        r[f"raw.catch_up.{shape}"] = run_job(
            "raw", "catch_up", stores.fresh(f"raw_{shape}"), shape=shape,
            count=s.catch_up_events,
        )  # fmt: skip
    if want("catch_up"):
        r["ours.replay"] = run_job("ours", "replay", log, head=head, cap=s.catch_up_cap)
    # ---- versions: one upcast step against none, UPCAST_PAIRS pairs of runs in one process,
    # each pair back to back (see bench_ours.upcast_pairs); then a version bump
    if want("upcast"):
        paired = run_job(
            "ours", "upcast_pairs", log, head=head, count=s.catch_up_events,
            cap=s.catch_up_cap, pairs=UPCAST_PAIRS,
            dispatch_stores=[stores.fresh(f"dispatch{i}") for i in range(2 * UPCAST_PAIRS)],
        )  # fmt: skip
        r.update(upcast_results(paired))
    if want("rebuild"):
        r["ours.rebuild"] = run_job("ours", "rebuild", log, head=head)
    if want("per_entity"):
        r.update(measure_per_entity(backend, s, stores))
    if want("elsewhere"):
        r.update(elsewhere(stores, log, head, s))
    # ---- load, latency, large replay: one process on SQLite
    if not want("load"):
        pass
    elif sqlite_only:
        r["ours.sustained"] = run_job(
            "ours", "sustained", stores.fresh("sustained"), callers=64,
            seconds=s.sustained_seconds,
        )  # fmt: skip
        r["ours.ack_visible"] = run_job(
            "ours", "ack_visible", stores.fresh("ack"), rate=1000, seconds=s.ack_seconds
        )
        if s.large_replay:  # last: the longest
            big_log = stores.fresh("replay1m")
            r["ours.replay_large"] = big = run_job(
                "ours", "replay_large", big_log, count=s.large_replay,
                fill_cap=s.large_fill_cap, cap=s.large_cap,
            )  # fmt: skip
            if big.get("stored"):  # a version bump of an aggregate of the whole large log
                r["ours.rebuild_large"] = run_job(
                    "ours", "rebuild", big_log, head=int(big["stored"])
                )
    else:
        r["ours.cluster"] = cluster(stores, s.sustained_seconds)
    return r


def measure_per_entity(backend: str, s: Sizes, stores: Stores) -> dict[str, dict[str, Any]]:
    """The per-entity read model (one row per account, read-then-update by an indexed key) at
    each of ``s.entity_rows``: every subject fills its table the same way (a bulk insert, not
    timed) and is timed on the same deposits."""
    r: dict[str, dict[str, Any]] = {}
    for rows in s.entity_rows:
        size = {"rows": rows, "events": s.entity_events}
        r[f"ours.per_entity.{rows}"] = run_job(
            "ours", "per_entity", stores.fresh(f"entity{rows}"), **size, cap=s.entity_cap
        )
        if backend == "sqlite":  # eventsourcing's SQLite view only (its job is for SQLite)
            r[f"es.per_entity.{rows}"] = run_job(
                "es", "per_entity", stores.fresh(f"es_entity{rows}"), **size, cap=s.entity_cap
            )
        r[f"raw.per_entity.{rows}"] = run_job(
            "raw", "per_entity", stores.fresh(f"raw_entity{rows}"), **size
        )
    return r


ELSEWHERE: tuple[tuple[RemoteShape, str], ...] = (
    ("create", "create-only"),
    ("summary_keyed", "read-then-update, key=country"),
    ("summary", "read-then-update, no key"),
)


def elsewhere(stores: Stores, log: dict[str, Any], head: int, s: Sizes) -> dict[str, Any]:
    """The catch-up of a new aggregate whose transformation (``summarizer.transform``) is
    served on the projector's node, then only by a second node (its own process) over a real
    nats-server; with ``before``, the second node does not take many calls in one request (the
    projector calls it once per event, as it did before)."""
    from moleculerpy_cqrs.testing.nats_server import NatsServer

    url = stores.stack.enter_context(NatsServer()).url
    r: dict[str, Any] = {}
    # Local and remote in turn, twice (the second round the other way round); the better of
    # the two counts for each (the box is shared). One call per event: once, on the full size.
    rounds = [[("local", True), ("remote", True)], [("remote", True), ("local", True)]]
    if s.rounds >= 2:
        rounds[-1].append(("remote", False))
    for shape, _ in ELSEWHERE:
        for round_, variants in enumerate(rounds):
            for where, call_many in variants:
                key = f"ours.elsewhere.{shape}.{where}" + ("" if call_many else ".before")
                got = elsewhere_job(stores, log, s, url, head, shape, where, call_many, round_)
                kept: list[dict[str, Any]] = [*r.get(key, {}).get("rounds", []), got]
                best = max(kept, key=lambda x: float(x.get("per_second") or 0.0))
                r[key] = {**best, "rounds": kept}
    return r


def elsewhere_job(
    stores: Stores, log: dict[str, Any], s: Sizes, url: str, head: int, shape: RemoteShape,
    where: str, call_many: bool, round_: int,
) -> dict[str, Any]:  # fmt: skip
    """One catch-up of ``elsewhere``: a new aggregate (named for the round) each time."""
    params = dict(shape=shape, where=where, transporter=url, head=head, cap=s.catch_up_cap,
                  call_many=call_many, round=round_)  # fmt: skip
    if where == "local":
        return run_job("ours", "catch_up_nats", log, **params)
    ready = stores.workdir / f"summarizer-{shape}-{int(call_many)}-{round_}"
    node = start_job(
        "ours", "summarizer_node", log, shape=shape, transporter=url,
        node_id="summarizer", ready=str(ready), call_many=call_many, round=round_,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError("the summarizer node did not start")
            time.sleep(0.05)
        return run_job("ours", "catch_up_nats", log, **params)
    except RuntimeError as error:
        return {"error": str(error)}
    finally:
        result_of(node, "stop\n")


def cluster(stores: Stores, seconds: float, nodes: int = 3) -> dict[str, Any]:
    """The profile example on ``nodes`` nodes over NATS sharing one PostgreSQL schema, and a
    driver process with 64 callers; the nodes' peak RSS is kept with the driver's figures."""
    from moleculerpy_cqrs.testing.nats_server import NatsServer

    url = stores.stack.enter_context(NatsServer()).url
    store = stores.fresh("cluster")
    ready = stores.workdir / "cluster-ready"
    ready.mkdir()
    say(f"ours cluster: {nodes} nodes over NATS on one PostgreSQL schema")
    procs = [
        start_job(
            "ours",
            "cluster_node",
            store,
            transporter=url,
            node_id=f"node-{n}",
            ready=str(ready / f"node-{n}"),
        )
        for n in range(1, nodes + 1)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < nodes:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the cluster's nodes did not start")
            time.sleep(0.1)
        result = run_job(
            "ours", "cluster_load", store, transporter=url, callers=64, seconds=seconds,
            nodes=nodes,
        )  # fmt: skip
    except RuntimeError as error:
        result = {"error": str(error)}
    finally:
        node_results = [result_of(p, "stop\n") for p in procs]
    result["nodes_peak_rss_mb"] = [n.get("peak_rss_mb") for n in node_results]
    result["peak_rss_mb"] = max(
        [float(x) for x in result["nodes_peak_rss_mb"] if x] + [result.get("peak_rss_mb") or 0.0]
    )
    return result


# ---------------------------------------------------------------------- the table


@dataclass
class Row:
    scenario: str
    unit: str  # "/s", "ms", "MB", "s" (the last three: lower is better)
    ours: float | None
    es: float | None = None
    raw: float | None = None
    targets: list[tuple[str, Callable[[Row], bool | None]]] = field(default_factory=list)
    note: str = ""

    @property
    def es_ratio(self) -> float | None:
        return ratio(self.ours, self.es)

    @property
    def raw_ratio(self) -> float | None:
        return ratio(self.ours, self.raw)

    def met(self) -> str:
        if not self.targets:
            return ""
        verdicts = [check(self) for _, check in self.targets]
        if any(v is None for v in verdicts):
            return "?"
        return "yes" if all(verdicts) else "NO"

    def cells(self) -> list[str]:
        return [
            self.scenario + (f" ({self.note})" if self.note else ""),
            fmt(self.ours, self.unit),
            fmt(self.es, self.unit),
            fmt_ratio(self.es_ratio),
            fmt(self.raw, self.unit),
            fmt_ratio(self.raw_ratio),
            "; ".join(t for t, _ in self.targets),
            self.met(),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "ours": self.ours,
            "eventsourcing": self.es,
            "ratio": self.es_ratio,
            "raw": self.raw,
            "ratio_to_raw": self.raw_ratio,
            "target": "; ".join(t for t, _ in self.targets),
            "met": self.met(),
            "note": self.note,
        }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "s":
        return f"{value:,.1f} s"
    return f"{value:,.2f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def get(results: dict[str, dict[str, Any]], key: str, figure: str) -> float | None:
    value = results.get(key, {}).get(figure)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def at_least(target: float, of: str = "") -> Callable[[Row], bool | None]:
    def check(row: Row) -> bool | None:
        value = {"": row.ours, "es": row.es_ratio, "raw": row.raw_ratio}[of]
        return None if value is None else value >= target

    return check


def share_at_least(share: float | None, target: float) -> Callable[[Row], bool | None]:
    """A target on a ratio measured beside the row (not on the row's own figures)."""
    return lambda row: None if share is None else share >= target


def at_most(target: float) -> Callable[[Row], bool | None]:
    return lambda row: None if row.ours is None else row.ours <= target


def build_rows(backend: str, r: dict[str, dict[str, Any]], sizes: Sizes) -> list[Row]:
    sq = backend == "sqlite"
    rows: list[Row] = []

    def keeps(on: str, off: str) -> tuple[str, Callable[[Row], bool | None]]:
        share = ratio(get(r, on, "per_second"), get(r, off, "per_second"))
        return (
            ">= 0.8x dispatcher off" + (f" ({share:.2f}x)" if share is not None else ""),
            lambda row: None if share is None else share >= 0.8,
        )

    one_on = Row(
        "appends, 1 caller, dispatcher on", "/s", get(r, "ours.appends.1.on", "per_second"),
        get(r, "es.appends.1", "per_second"), get(r, "raw.appends.1", "per_second"),
    )  # fmt: skip
    if sq:
        one_on.targets = [
            (">= 1.2x es", at_least(1.2, "es")),
            (">= 0.6x raw", at_least(0.6, "raw")),
        ]
    else:
        one_on.targets = [(">= 1.0x es", at_least(1.0, "es"))]
    one_on.targets.append(keeps("ours.appends.1.on", "ours.appends.1.off"))
    rows.append(one_on)
    rows.append(Row(
        "appends, 1 caller, dispatcher off", "/s", get(r, "ours.appends.1.off", "per_second"),
        get(r, "es.appends.1", "per_second"), get(r, "raw.appends.1", "per_second"),
    ))  # fmt: skip
    rows.append(Row(
        "p99 ack, 1 caller, dispatcher on", "ms", get(r, "ours.appends.1.on", "p99_ms"),
        get(r, "es.appends.1", "p99_ms"), get(r, "raw.appends.1", "p99_ms"),
    ))  # fmt: skip
    many_on = Row(
        "appends, 64 callers, dispatcher on", "/s", get(r, "ours.appends.64.on", "per_second"),
        get(r, "es.appends.64", "per_second"), get(r, "raw.appends.64", "per_second"),
        note="es: 64 threads; raw: 64-row transactions",
    )  # fmt: skip
    if sq:
        many_on.targets = [(">= 10x es", at_least(10, "es")), (">= 0.5x raw", at_least(0.5, "raw"))]
    else:
        many_on.targets = [(">= 15,000/s", at_least(15_000))]
    many_on.targets.append(keeps("ours.appends.64.on", "ours.appends.64.off"))
    rows.append(many_on)
    rows.append(Row(
        "p99 ack, 64 callers, dispatcher on", "ms", get(r, "ours.appends.64.on", "p99_ms"),
        get(r, "es.appends.64", "p99_ms"), get(r, "raw.appends.64", "p99_ms"),
        targets=[("<= 10 ms", at_most(10))] if sq else [],
    ))  # fmt: skip
    rows.append(Row(
        "appends, 64 callers, dispatcher off", "/s", get(r, "ours.appends.64.off", "per_second"),
        get(r, "es.appends.64", "per_second"), get(r, "raw.appends.64", "per_second"),
        targets=[(">= 15,000/s", at_least(15_000))] if not sq else [],
    ))  # fmt: skip
    for callers in (1, 64):
        plain = get(r, f"ours.appends.{callers}.on", "per_second")
        keyed = get(r, f"ours.keyed.{callers}", "per_second")
        share = ratio(keyed, plain)
        rows.append(Row(
            f"appends with idempotency keys, {callers} caller{'s' if callers > 1 else ''}", "/s",
            keyed,
            targets=[(
                ">= 0.9x without keys" + (f" ({share:.2f}x)" if share is not None else ""),
                share_at_least(share, 0.9),
            )],
            note=f"without keys {fmt(plain, '/s')}",
        ))  # fmt: skip
    filled = int(get(r, "ours.keyed_fill", "events") or 0)
    for callers in (1, 64):
        empty = get(r, f"ours.keyed_empty.{callers}", "per_second")
        large = get(r, f"ours.keyed_large.{callers}", "per_second")
        share = ratio(large, empty)
        rows.append(Row(
            f"keyed appends into a log of {filled:,}, {callers} caller{'s' if callers > 1 else ''}",
            "/s", large,
            targets=[(
                ">= 0.8x empty log" + (f" ({share:.2f}x)" if share is not None else ""),
                share_at_least(share, 0.8),
            )],
            note=f"empty log {fmt(empty, '/s')}",
        ))  # fmt: skip
    n = int(get(r, "ours.prefill", "events") or sizes.catch_up_events)
    for shape, label in (("create", "create-only"), ("summary", "read-then-update")):
        for kind in ("action", "callable"):
            key = f"ours.catch_up.{shape}.{kind}"
            row = Row(
                f"catch-up {n:,} ev, {label}, {kind}", "/s", get(r, key, "per_second"),
                get(r, f"es.catch_up.{shape}", "per_second"),
                get(r, f"raw.catch_up.{shape}", "per_second"),
                note=completeness(r, key, f"es.catch_up.{shape}"),
            )  # fmt: skip
            if sq and shape == "create":
                want = 0.25 if kind == "action" else 0.5
                row.targets = [(f">= {want}x raw", at_least(want, "raw"))]
            elif sq and kind == "action":
                row.targets = [
                    (">= 0.2x raw", at_least(0.2, "raw")),
                    (">= 5x es", at_least(5, "es")),
                ]
            elif not sq and kind == "action":
                want = 20_000 if shape == "create" else 8_000
                row.targets = [(f">= {want:,}/s", at_least(want))]
            rows.append(row)
    rows.append(Row(
        f"replay {n:,} ev, create-only", "/s", get(r, "ours.replay", "per_second"), None,
        get(r, "raw.catch_up.create", "per_second"),
        note=completeness(r, "ours.replay", "raw: the same job as its catch-up"),
    ))  # fmt: skip
    for what, label in (("catch_up", "catch-up, create-only callable"), ("dispatch", "dispatch")):
        shares = upcast_shares(r, what)
        share = statistics.median(shares) if shares else None
        rows.append(Row(
            f"{label} {n:,} ev, one upcast step, as a share of none (median of "
            f"{len(shares)} pairs)", "x", share,
            targets=[(">= 0.9x", lambda row: None if row.ours is None else row.ours >= 0.9)],
            note="pairs " + " ".join(fmt_ratio(x) for x in shares) + "; best "
            f"{fmt(get(r, f'ours.upcast.{what}.True', 'per_second'), '/s')} vs "
            f"{fmt(get(r, f'ours.upcast.{what}.False', 'per_second'), '/s')}",
        ))  # fmt: skip
    rows += rebuild_rows(r, "ours.rebuild")
    rows += entity_rows(sq, r, sizes)
    for shape, label in ELSEWHERE:
        local = get(r, f"ours.elsewhere.{shape}.local", "per_second")
        there = get(r, f"ours.elsewhere.{shape}.remote", "per_second")
        before = get(r, f"ours.elsewhere.{shape}.remote.before", "per_second")
        share = ratio(there, local)
        notes = [f"local {fmt(local, '/s')}", f"{fmt_ratio(share)} of local"]
        if before is not None:
            notes.append(f"one call per event: {fmt(before, '/s')}")
        done = completeness(r, f"ours.elsewhere.{shape}.local", f"ours.elsewhere.{shape}.remote")
        row = Row(
            f"transformation on another node over NATS: {label}", "/s", there,
            note=", ".join([*notes, *([done] if done else [])]),
        )  # fmt: skip
        if shape != "summary":
            row.targets = [half_of_local(share)]
        rows.append(row)
    if "ours.replay_large" in r:
        big = r["ours.replay_large"]
        stored = int(big.get("stored") or 0)
        rate = get(r, "ours.replay_large", "per_second")
        seconds = 1_000_000 / rate if rate else None
        done = "" if big.get("complete") else f"extrapolated from {int(big.get('events') or 0):,}"
        rows.append(Row(
            "replay 1,000,000 ev, create-only", "s", seconds,
            targets=[("<= 20 s", at_most(20))],
            note=", ".join(x for x in (f"log of {stored:,}", done) if x),
        ))  # fmt: skip
        rows.append(Row(
            "peak RSS, replay of the 1M log", "MB", get(r, "ours.replay_large", "peak_rss_mb"),
            targets=[("<= 200 MB", at_most(200))],
        ))  # fmt: skip
    if "ours.rebuild_large" in r:
        rows += rebuild_rows(r, "ours.rebuild_large")
    if "ours.sustained" in r:
        secs = sizes.sustained_seconds
        rows.append(Row(
            f"sustained, 64 callers {secs:.0f} s: appends", "/s",
            get(r, "ours.sustained", "per_second"),
        ))  # fmt: skip
        rows.append(Row(
            "sustained: projector applied", "/s",
            get(r, "ours.sustained", "projector_applied_per_second"),
        ))  # fmt: skip
        for who in ("projector", "dispatcher"):
            events = get(r, "ours.sustained", f"{who}_lag_events")
            rows.append(Row(
                f"sustained: {who} lag at the end", "s",
                get(r, "ours.sustained", f"{who}_lag_seconds_worth"),
                targets=[("<= 1 s of appends", at_most(1.0))],
                note="" if events is None else f"{events:,.0f} events",
            ))  # fmt: skip
    if "ours.cluster" in r:
        rows.append(Row(
            f"3 nodes over NATS, 64 callers {sizes.sustained_seconds:.0f} s: appends", "/s",
            get(r, "ours.cluster", "per_second"),
        ))  # fmt: skip
        for who in ("projector", "dispatcher"):
            events = get(r, "ours.cluster", f"{who}_lag_events")
            rows.append(Row(
                f"3 nodes: {who} lag at the end", "s",
                get(r, "ours.cluster", f"{who}_lag_seconds_worth"),
                targets=[("<= 1 s of appends", at_most(1.0))],
                note="" if events is None else f"{events:,.0f} events",
            ))  # fmt: skip
    if "ours.ack_visible" in r:
        offered = get(r, "ours.ack_visible", "offered_per_second")
        rows.append(Row(
            "ack -> visible p50", "ms", get(r, "ours.ack_visible", "p50_ms"),
            note="" if offered is None else f"{offered:,.0f} appends/s offered",
        ))  # fmt: skip
        rows.append(Row(
            "ack -> visible p99", "ms", get(r, "ours.ack_visible", "p99_ms"),
            targets=[("<= 50 ms", at_most(50))],
        ))  # fmt: skip
    rss = {
        who: max(
            (v.get("peak_rss_mb") or 0.0 for k, v in r.items() if k.startswith(who)), default=None
        )
        for who in ("ours.", "es.", "raw.")
    }
    rows.append(Row(
        "peak RSS, largest process", "MB", rss["ours."], rss["es."], rss["raw."],
        note="1M replay included" if "ours.replay_large" in r else "",
    ))  # fmt: skip
    return rows


def half_of_local(share: float | None) -> tuple[str, Callable[[Row], bool | None]]:
    label = ">= 0.5x local" + ("" if share is None else f" ({share:.2f}x)")
    return label, lambda row: None if share is None else share >= 0.5


def rebuild_rows(r: dict[str, dict[str, Any]], key: str) -> list[Row]:
    """A version bump's rebuild against ``replay`` of the same log, and the reads during it."""
    bump = r.get(key, {})
    n = int(bump.get("events") or 0)
    return [
        Row(
            f"version-bump rebuild {n:,} ev, as a share of replay", "x",
            get(r, key, "rebuild_over_replay"),
            targets=[("<= 1.2x", lambda row: None if row.ours is None else row.ours <= 1.2)],
            note=f"{fmt(bump.get('rebuild_seconds'), 's')} vs "
            f"{fmt(bump.get('replay_seconds'), 's')}",
        ),
        Row(
            f"reads during the {n:,}-event rebuild, p99", "ms", get(r, key, "read_p99_ms"),
            note=f"{bump.get('reads', 0):,} reads by id, {bump.get('reads_failed', 0)} failed; "
            f"during replay p99 {fmt(bump.get('read_p99_ms_during_replay'), 'ms')}",
            targets=[("0 failed", lambda row: None if not bump else bump.get("reads_failed") == 0)],
        ),
    ]  # fmt: skip


UPCAST_PAIRS: Final = 7


def upcast_results(paired: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``upcast_pairs`` job's runs as results by job key (``ours.upcast.<job>.<step>``):
    the fastest run, with every run of that side in ``rounds`` (pair by pair)."""
    out: dict[str, dict[str, Any]] = {}
    for job in ("catch_up", "dispatch"):
        for step, side in ((True, "with"), (False, "without")):
            runs = (paired.get(job) or {}).get(side) or []
            if runs:
                kept = max(runs, key=lambda x: float(x.get("per_second") or 0.0))
                out[f"ours.upcast.{job}.{step}"] = {**kept, "rounds": runs}
    return out


def upcast_shares(r: dict[str, dict[str, Any]], what: str) -> list[float]:
    """Each pair's rate with one upcast step over the rate without (the two runs of a pair
    were made back to back in one process)."""
    entries = (r.get(f"ours.upcast.{what}.{step}") or {} for step in (True, False))
    # A result made without rounds (one run of each) is one pair.
    with_step, without = (e.get("rounds") or ([e] if e else []) for e in entries)
    return [
        float(a["per_second"]) / float(b["per_second"])
        for a, b in zip(with_step, without, strict=False)
        if a.get("per_second") and b.get("per_second")
    ]


def entity_rows(sq: bool, r: dict[str, dict[str, Any]], sizes: Sizes) -> list[Row]:
    """Per-entity read model rows; the targets apply at ``ENTITY_TARGET_ROWS`` rows."""
    out: list[Row] = []
    smallest = get(r, f"ours.per_entity.{min(sizes.entity_rows)}", "per_second")
    for rows in sizes.entity_rows:
        key = f"ours.per_entity.{rows}"
        row = Row(
            f"per-entity {rows:,} rows, {sizes.entity_events:,} deposits, action + find by key",
            "/s", get(r, key, "per_second"), get(r, f"es.per_entity.{rows}", "per_second"),
            get(r, f"raw.per_entity.{rows}", "per_second"),
            note=completeness(r, key, f"es.per_entity.{rows}", f"raw.per_entity.{rows}"),
        )  # fmt: skip
        if rows == ENTITY_TARGET_ROWS and sq:
            share = ratio(row.ours, smallest)

            def keeps_rate(_row: Row, share: float | None = share) -> bool | None:
                return None if share is None else share >= 0.7

            row.targets = [
                (">= 10,000/s", at_least(10_000)),
                (">= 4x es", at_least(4, "es")),
                (">= 0.15x raw", at_least(0.15, "raw")),
                (">= 0.7x the 1,000-row rate" + (f" ({share:.2f}x)" if share else ""), keeps_rate),
            ]
        elif rows == ENTITY_TARGET_ROWS:
            row.targets = [(">= 5,000/s", at_least(5_000))]
        out.append(row)
    return out


def completeness(r: dict[str, dict[str, Any]], *keys: str) -> str:
    notes = []
    for key in keys:
        result = r.get(key)
        if result is None:
            notes.append(key) if not key.startswith(("ours", "es", "raw")) else None
            continue
        who = key.split(".")[0]
        if "error" in result:
            notes.append(f"{who} failed")
        elif result.get("complete") is False:
            notes.append(f"{who} capped at {int(result.get('events') or 0):,}")
        if result.get("correct") is False:
            notes.append(f"{who} WRONG totals")
    return ", ".join(notes)


# ---------------------------------------------------------------------- the header, output


def header(backends: list[str], stores: dict[str, Stores], workdir: Path) -> dict[str, Any]:
    p50, p99 = fsync_latency(workdir, 300)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "benchmarks/run " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()} "
        f"{platform.machine()}",
        "uptime": uptime.strip(),
        "fsync": f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms "
        "(300 x 4 KiB write + fsync in the run's temp folder)",
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "postgresql": stores["postgres"].server_version if "postgres" in stores else "not run",
        "versions": f"moleculerpy-cqrs {version('moleculerpy-cqrs')}, moleculerpy "
        f"{version('moleculerpy')}, eventsourcing {version('eventsourcing')}, psycopg "
        f"{version('psycopg')}",
        "durability": "SQLite: WAL, synchronous=FULL for every subject (read back per process); "
        "PostgreSQL: private server, fsync on",
    }


def durability_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """What each subject's processes read back, without the per-process connection counts."""
    seen: dict[str, set[str]] = {}
    for key, result in results.items():
        for part in str(result.get("durability", "?")).split(", "):
            seen.setdefault(key.split(".")[0], set()).add(part.split(" (x")[0])
    return [f"  read back, {who}: {' | '.join(sorted(v))}" for who, v in seen.items()]


def draw(path: Path, rows_by_backend: dict[str, list[Row]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    es: list[float] = []
    raw: list[float] = []
    for backend, rows in rows_by_backend.items():
        for row in rows:
            if row.unit == "/s" and (row.es_ratio or row.raw_ratio):
                labels.append(f"{backend}: {row.scenario}")
                es.append(row.es_ratio or 0.0)
                raw.append(row.raw_ratio or 0.0)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], es, height=0.4, label="this project / eventsourcing 9.5.6")
    ax.barh([y + 0.2 for y in ys], raw, height=0.4, label="this project / raw driver")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("throughput ratio (log scale; > 1: this project is faster)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("moleculerpy-cqrs against its peers, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under 3 minutes)")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "all"), default="sqlite")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--only", action="append", default=[], metavar="GROUP",
        help=f"run only this group of jobs (a prefix of one of: {', '.join(GROUPS)}); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--entity-rows",
        type=row_counts,
        metavar="N,N",
        help="per-entity table sizes, filled before timing (default 1000,1000000; --quick "
        "1000,20000); the targets are checked at 1000000, against the smallest size",
    )
    parser.add_argument(
        "--entity-events",
        type=int,
        metavar="N",
        help="per-entity deposits applied, timed (default 20000; --quick 3000)",
    )
    args = parser.parse_args()
    only = tuple(args.only)
    if unknown := [o for o in only if not any(g.startswith(o) for g in GROUPS)]:
        parser.error(f"--only {unknown[0]}: no such group (groups: {', '.join(GROUPS)})")
    sizes = QUICK if args.quick else FULL
    if args.entity_rows:
        sizes = replace(sizes, entity_rows=args.entity_rows)
    if args.entity_events:
        sizes = replace(sizes, entity_events=args.entity_events)
    backends = ["sqlite", "postgres"] if args.backend == "all" else [args.backend]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cqrs-bench-run-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    rows: dict[str, list[Row]] = {}
    try:
        with contextlib.ExitStack() as stack:
            stores = {b: Stores(b, workdir / b, stack) for b in backends}
            for b in backends:
                (workdir / b).mkdir(exist_ok=True)
            head = header(backends, stores, workdir)
            for line in header_lines(head):
                say(line)
            for b in backends:
                results[b] = measure(b, sizes, stores[b], only)
                rows[b] = build_rows(b, results[b], sizes)
                if only:  # the rows of the groups run
                    rows[b] = [row for row in rows[b] if row.ours is not None]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    head["whole_run_seconds"] = round(elapsed, 1)
    head["load_after"] = "/".join(f"{v:.2f}" for v in os.getloadavg())
    lines = header_lines(head)
    cells: list[list[str]] = []
    for b in backends:
        lines += [f"read back ({b}):", *durability_lines(results[b])]
        prefix = f"{b}: " if len(backends) > 1 else ""
        cells += [[prefix + c[0], *c[1:]] for c in (row.cells() for row in rows[b])]
    lines += [
        "",
        f"One table ({', '.join(backends)}); ratio = this project / peer (for ms, MB and s rows "
        "lower is better)",
        *table(
            ["scenario", "this project", "eventsourcing", "ratio", "raw driver",
             "ratio to raw", "target", "met"],
            cells,
        ),
    ]  # fmt: skip
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stamp}.json"
    png_path = args.out / f"{stamp}.png"
    json_path.write_text(
        json.dumps(
            {
                "header": head,
                "sizes": sizes.__dict__,
                "backends": {
                    b: {"rows": [row.as_json() for row in rows[b]], "jobs": results[b]}
                    for b in backends
                },
            },
            indent=2,
            default=str,
        )
    )
    draw(png_path, rows)
    print(f"\nwrote {json_path} and {png_path} (whole run {elapsed:.0f} s)")


def row_counts(text: str) -> tuple[int, ...]:
    """``--entity-rows``: table sizes, comma-separated (``1000,1000000``)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("row counts must be positive")
    return counts


def header_lines(head: dict[str, Any]) -> list[str]:
    keys = ("date", "command", "machine", "uptime", "fsync", "python", "sqlite", "postgresql",
            "versions", "durability", "whole_run_seconds", "load_after")  # fmt: skip
    return [f"{k:<11} {head[k]}" for k in keys if k in head]


if __name__ == "__main__":
    main()
