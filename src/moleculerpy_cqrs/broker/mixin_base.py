"""The base of every mixin the toolkit hands out, and how components hook into a service.

MoleculerPy's own ``mixins = [...]`` never registers a mixin's actions, so the toolkit's mixins
are plain base classes. Their lifecycle work must run even when the user's service defines
its own ``created``/``started``/``stopped`` without calling ``super()``: user hooks are wrapped
when the class is defined, and the toolkit's part runs once per service instance.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

_HOOKS = ("created", "started", "stopped")


class Component(Protocol):
    """An event store or an aggregate, as a service that mixes it in sees it."""

    async def on_created(self, service: Any) -> None: ...

    async def on_started(self, service: Any) -> None: ...

    async def on_stopped(self, service: Any) -> None: ...


class CqrsMixin:
    _cqrs_component: ClassVar[Component | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_cqrs_component" in cls.__dict__:
            return  # one of ours
        for hook in _HOOKS:
            user_hook = cls.__dict__.get(hook)
            if callable(user_hook) and not getattr(user_hook, "_cqrs_wrapped", False):
                setattr(cls, hook, _wrap(hook, user_hook))

    async def created(self) -> None:
        await _run_components(self, "created")

    async def started(self) -> None:
        await _run_components(self, "started")

    async def stopped(self) -> None:
        await _run_components(self, "stopped")


def components(service: Any) -> list[Component]:
    found: list[Component] = []
    for klass in type(service).__mro__:
        component = klass.__dict__.get("_cqrs_component")
        if component is not None and component not in found:
            found.append(component)
    return found


async def _run_components(service: Any, hook: str) -> None:
    done = _done_of(service)
    if hook in done:
        return
    done.add(hook)
    if hook == "started":
        done.discard("stopped")
    if hook == "stopped":
        done.discard("started")
    found = components(service)
    for component in reversed(found) if hook == "stopped" else found:
        await getattr(component, f"on_{hook}")(service)


def _done_of(service: Any) -> set[str]:
    try:
        done: set[str] = service._cqrs_done
    except AttributeError:
        done = set()
        service._cqrs_done = done
    return done


def _wrap(
    hook: str, user_hook: Callable[[Any], Awaitable[None]]
) -> Callable[[Any], Awaitable[None]]:
    @functools.wraps(user_hook)
    async def wrapped(self: Any) -> None:
        if hook != "stopped":
            await _run_components(self, hook)
        await user_hook(self)
        if hook == "stopped":
            await _run_components(self, hook)

    wrapped._cqrs_wrapped = True  # type: ignore[attr-defined]
    return wrapped
