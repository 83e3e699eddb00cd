"""One name, one thing: event stores, aggregates and services may not share a name.

MoleculerPy keeps one service per name in a node's registry and announces only that one to
the other nodes, while every action stays callable locally. So an ``EventStore("orders")``
mixed into a service named ``orders`` works in one process on ``memory://`` and loses the
service's own actions for every other node (``ServiceNotFoundError`` for ``orders.place``).

Refused here, with one line naming both:

* on a node, when an event store's or aggregate's service is registered under a name that a
  service already has (:func:`refuse_local_clash`), or a service is registered under a name
  already taken (:class:`NameGuard`, a broker middleware);
* in the cluster, when another node serves a name of ours as a different kind of thing (an
  event store here, a plain service there). Several instances of one service, event store or
  aggregate on several nodes are not a clash: that is how they scale. The guard logs
  such a clash at ERROR when the other node appears, and
  ``cqrs run`` refuses to start a node that clashes with a running one (:func:`remote_clashes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from moleculerpy import Service, ServiceBroker

from moleculerpy_cqrs.errors import ConfigurationError

log = logging.getLogger(__name__)

KIND_KEY = "cqrsKind"
"""The key of a service's ``metadata`` (announced to other nodes) that says what it is."""

EVENT_STORE = "event store"
AGGREGATE = "aggregate"
SERVICE = "service"


def mark(service: Service, kind: str) -> None:
    """Announce ``service`` as an event store's or an aggregate's own service."""
    service.metadata = {**service.metadata, KIND_KEY: kind}


def kind_of(metadata: Mapping[str, Any] | None) -> str:
    value = (metadata or {}).get(KIND_KEY)
    return value if isinstance(value, str) else SERVICE


def _key(service: Service) -> str:
    full = getattr(service, "full_name", None)
    return full if isinstance(full, str) else service.name


def _local_services(broker: ServiceBroker) -> dict[str, Service]:
    services: dict[str, Service] = broker.registry.__services__
    return services


def refuse_local_clash(broker: ServiceBroker, name: str, what: str) -> None:
    """Refuse to register ``what`` (e.g. "event store 'orders' (of service 'shop')") under
    ``name`` when a service of that name is already registered on this node."""
    existing = _local_services(broker).get(name)
    if existing is not None:
        raise ConfigurationError(
            f"name clash on node {broker.nodeID}: {what} and "
            f"{_describe(kind_of(existing.metadata), name)} are both named {name!r}; rename "
            "one of them (other nodes would find only one of them)"
        )


def _describe(kind: str, name: str) -> str:
    return f"the {kind} {name!r}"


class NameGuard:
    """A broker middleware refusing a second, different service under a name already
    registered on the node (MoleculerPy would replace the first in what it announces); it
    also logs each clash with another node's services, once, when that node appears."""

    def __init__(self, broker: ServiceBroker) -> None:
        self.broker = broker
        self.logged: set[str] = set()

    async def on_node(self, payload: Any) -> None:
        for line in remote_clashes(self.broker):
            if line not in self.logged:
                self.logged.add(line)
                log.error("%s", line)

    async def service_creating(self, service: Service) -> None:
        broker = service.broker
        if broker is None:
            return
        key = _key(service)
        existing = _local_services(broker).get(key)
        if existing is not None and existing is not service:
            raise ConfigurationError(
                f"name clash on node {broker.nodeID}: "
                f"{_describe(kind_of(service.metadata), key)} and "
                f"{_describe(kind_of(existing.metadata), key)} are both named {key!r}; "
                "rename one of them (other nodes would find only one of them)"
            )


def install_guard(broker: ServiceBroker) -> None:
    """Add :class:`NameGuard` to the broker's middlewares once."""
    if not any(isinstance(m, NameGuard) for m in broker.middlewares):
        guard = NameGuard(broker)
        # A new list: the old one may be a Settings.middlewares list shared with other brokers.
        cast(Any, broker).middlewares = [*broker.middlewares, guard]
        broker.local_bus.on("$node.connected", guard.on_node)
        broker.local_bus.on("$node.updated", guard.on_node)


def remote_clashes(broker: ServiceBroker) -> list[str]:
    """A line for each service of another node that has the name of a local service but is
    another kind of thing."""
    lines: list[str] = []
    local = _local_services(broker)
    for node_id, node in list(broker.node_catalog.nodes.items()):
        if node.local or node_id == broker.nodeID or not node.available:
            continue
        for definition in node.services or []:
            name = definition.get("fullName") or definition.get("name")
            if not isinstance(name, str) or name not in local:
                continue
            mine = local[name]
            ours, theirs = kind_of(mine.metadata), kind_of(definition.get("metadata"))
            if ours != theirs:
                lines.append(
                    f"name clash in the cluster: {_describe(ours, name)} on node "
                    f"{broker.nodeID} and {_describe(theirs, name)} on node {node_id} are "
                    f"both named {name!r}; rename one of them"
                )
    return lines
