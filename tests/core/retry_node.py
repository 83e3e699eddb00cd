"""A node for the idempotent crash test: the profile example plus callers that send the
commands they are given, each with its idempotency key.

It reads the commands still unanswered (a JSON list of ``[key, params]``) from a file, sends
them with 64 callers and writes ``ack <key> <id>`` for each answer, ``done`` when all are
answered. The parent kills it at a random moment and starts it again with what is left: the
callers retry with the same key until answered.
Run: ``python -m tests.core.retry_node <backend> <location> <commands file>``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.crash_node import store_for


async def main(backend: str, location: str, pending: list[list[Any]]) -> None:
    *_, service = profile.build(store_for(backend, location), batch_size=50)
    async with running_broker(service()) as broker:
        print("ready", flush=True)

        async def caller() -> None:
            while pending:
                key, params = pending.pop()
                answer = await broker.call("profile.update", params, meta={"idempotencyKey": key})
                sys.stdout.write(f"ack {key} {answer['id']}\n")
                sys.stdout.flush()

        await asyncio.gather(*(caller() for _ in range(64)))
        print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(Path(sys.argv[3]).read_text())))
