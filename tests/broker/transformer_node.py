"""A node that serves ``summarizer.transform`` only, for the test of a node that dies.

Run: ``python -m tests.broker.transformer_node <nats url> <node id> <hang>``. Prints ``ready``
once started, and ``hung`` when the call for event ``hang`` arrives, which never answers: the
parent then kills this process.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from moleculerpy import Context, Service, ServiceBroker, Settings, action

from moleculerpy_cqrs.broker import compat


class Summarizer(Service):
    name = "summarizer"

    def __init__(self, hang: int) -> None:
        super().__init__(self.name)
        self.hang = hang

    @action(name="transform")
    async def transform(self, ctx: Context) -> Any:
        p = ctx.params["payload"]
        if p["n"] == self.hang:
            print("hung", flush=True)
            await asyncio.Event().wait()
        return {"name": p["name"], "country": p["country"], "n": p["n"]}


async def main(url: str, node_id: str, hang: int) -> None:
    settings = Settings(
        transporter=url, log_level="ERROR", heartbeat_interval=0.2, heartbeat_timeout=1.0
    )
    broker = ServiceBroker(node_id, settings=settings)
    compat.install(broker)
    await broker.register(Summarizer(hang))
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
