"""A node under load for the crash test: the profile example plus a writer.

It writes one line per acknowledged command to stdout (``ack <nonce>``) after the answer
came back, so the parent knows which commands were acknowledged before it kills this process.
Run: ``python -m tests.core.crash_node <backend> <location> <seed> [keyed]`` (``keyed``: 64
writers, the summary transformed concurrently by country).
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker


def store_for(backend: str, location: str) -> stores.StoreFactory:
    if backend == "sqlite":
        return stores.sqlite(location)
    dsn, schema = location.split("|")
    return stores.postgres(dsn, schema=schema)


async def main(backend: str, location: str, seed: int, keyed: bool) -> None:
    key = "country" if keyed else None
    *_, service = profile.build(store_for(backend, location), batch_size=50, key=key)
    rng = random.Random(seed)
    async with running_broker(service()) as broker:
        print("ready", flush=True)

        async def writer() -> None:
            while True:
                command = {**random_profile(rng), "nonce": uuid.uuid4().hex}
                await broker.call("profile.update", command)
                sys.stdout.write(f"ack {command['nonce']}\n")
                sys.stdout.flush()

        await asyncio.gather(*(writer() for _ in range(64 if keyed else 8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["keyed"]))
