"""One subject's scenario in a process of its own (started by ``benchmarks/harness.py``).

    python benchmarks/subject.py '<json job>'

Prints one line ``RESULT <json>``: the scenario's figures, the process's peak RSS, and the
durability settings read back in this process (every SQLite connection's ``journal_mode`` and
``synchronous`` as it closes; PostgreSQL's ``fsync`` and ``synchronous_commit``). With
``CQRS_BENCH_PROFILE=FOLDER`` in its environment, the process runs under cProfile and writes
FOLDER/<scenario>-<pid>.prof.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
pragmas: Counter[str] = Counter()


class ReadBackConnection(sqlite3.Connection):
    """Reads the durability PRAGMAs back just before the connection closes."""

    def close(self) -> None:
        try:
            mode = self.execute("PRAGMA journal_mode").fetchone()[0]
            sync = self.execute("PRAGMA synchronous").fetchone()[0]
            pragmas[f"journal_mode={mode} synchronous={SYNCHRONOUS.get(sync, sync)}"] += 1
        except sqlite3.Error:
            pass
        super().close()


_connect = sqlite3.connect


def _read_back_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    kwargs.setdefault("factory", ReadBackConnection)
    return _connect(*args, **kwargs)


def store_factory(store: dict[str, Any]) -> Any:
    from moleculerpy_cqrs import stores

    if store["kind"] == "sqlite":
        return stores.sqlite(store["dir"])
    return stores.postgres(store["dsn"], schema=store["schema"])


def postgres_settings(store: dict[str, Any]) -> str:
    import psycopg

    with psycopg.connect(store["dsn"], autocommit=True) as conn:
        fsync = conn.execute("SHOW fsync").fetchone()
        commit = conn.execute("SHOW synchronous_commit").fetchone()
    return f"fsync={fsync[0] if fsync else '?'} synchronous_commit={commit[0] if commit else '?'}"


def run(job: dict[str, Any]) -> dict[str, Any]:
    subject, scenario, store, p = job["subject"], job["scenario"], job["store"], job["params"]
    if subject == "ours":
        from benchmarks import bench_ours as ours

        factory = store_factory(store)
        work: Any = {
            "appends": lambda: ours.appends(
                factory,
                p["callers"],
                p["dispatch"],
                p["seconds"],
                p.get("keyed", False),
                p.get("key_prefix", "k"),
            ),
            "prefill": lambda: ours.prefill(factory, p["count"]),
            "prefill_keyed": lambda: ours.prefill_keyed(factory, p["count"]),
            "catch_up": lambda: ours.catch_up(
                factory,
                p["shape"],
                p["as_action"],
                p["head"],
                p["cap"],
                p.get("upcast"),
                p.get("round", 0),
            ),
            "dispatch": lambda: ours.dispatch(factory, p["count"], p["upcast"]),
            "upcast_pairs": lambda: ours.upcast_pairs(
                factory,
                p["head"],
                [store_factory(each) for each in p["dispatch_stores"]],
                p["count"],
                p["cap"],
                p["pairs"],
            ),
            "rebuild": lambda: ours.rebuild(factory, p["head"]),
            "replay": lambda: ours.replay(factory, p["head"], p["cap"], report),
            "replay_large": lambda: ours.replay_large(
                factory, p["count"], p["fill_cap"], p["cap"], report
            ),
            "sustained": lambda: ours.sustained(factory, p["callers"], p["seconds"]),
            "per_entity": lambda: ours.per_entity(factory, p["rows"], p["events"], p["cap"]),
            "ack_visible": lambda: ours.ack_to_visible(factory, p["rate"], p["seconds"]),
            "cluster_node": lambda: ours.cluster_node(
                factory, p["transporter"], p["node_id"], Path(p["ready"])
            ),
            "catch_up_nats": lambda: ours.catch_up_over_nats(
                factory,
                p["shape"],
                p["where"],
                p["transporter"],
                p["head"],
                p["cap"],
                p.get("call_many", True),
                p.get("round", 0),
            ),
            "summarizer_node": lambda: ours.summarizer_node(
                p["shape"],
                p["transporter"],
                p["node_id"],
                Path(p["ready"]),
                p["call_many"],
                p.get("round", 0),
            ),
            "cluster_load": lambda: ours.cluster_load(
                p["transporter"], p["callers"], p["seconds"], p["nodes"]
            ),
        }[scenario]
        figures: dict[str, Any] = asyncio.run(work())
    elif subject == "es":
        from benchmarks import bench_es as es

        if scenario == "appends":
            figures = es.appends(store, p["threads"], p["seconds"])
        elif scenario == "per_entity":
            figures = es.per_entity(store, p["rows"], p["events"], p["cap"])
        else:
            figures = es.catch_up(store, p["shape"], p["count"], p["cap"])
    else:
        from benchmarks import bench_raw as raw

        if scenario == "appends":
            figures = raw.appends(store, p["per_transaction"], p["seconds"])
        elif scenario == "per_entity":
            figures = raw.per_entity(store, p["rows"], p["events"])
        else:
            figures = raw.catch_up(store, p["shape"], p["count"])
    return figures


JOB: dict[str, Any] = {}


def report(figures: dict[str, Any]) -> None:
    """Print the figures and end the process (also from inside a scenario: a capped replay
    need not be waited for)."""
    if JOB["store"]["kind"] == "sqlite":
        durability = ", ".join(f"{k} (x{n})" for k, n in sorted(pragmas.items())) or "none read"
    else:
        durability = postgres_settings(JOB["store"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {**figures, "peak_rss_mb": peak, "durability": durability}
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # threads a peer left behind, or a replay still running, must not hold it


def main() -> None:
    sqlite3.connect = _read_back_connect  # type: ignore[assignment]
    JOB.update(json.loads(sys.argv[1]))
    folder = os.environ.get("CQRS_BENCH_PROFILE")
    if not folder:
        report(run(JOB))
    # Profiled (cProfile, this process only): the stats go to FOLDER/<scenario>-<pid>.prof.
    import cProfile

    profiler = cProfile.Profile()
    figures = profiler.runcall(run, JOB)
    profiler.dump_stats(Path(folder) / f"{JOB['scenario']}-{os.getpid()}.prof")
    report(figures)


if __name__ == "__main__":
    main()
