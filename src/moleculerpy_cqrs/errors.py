"""One error tree for the toolkit.

Every error that can reach a caller over the broker is also a Moleculer error with a code, so
it crosses nodes as one: 422 for bad input, 404 for a missing entity, 405 for a write the
aggregate does not take, 409 for a conflict, 413 for an answer too large to send, 500 for a
failing store. Each carries structured data and builds its message from it, and has a wire name
(``name`` in the error packet) ending in ``Error`` as Moleculer's own do; :func:`restore` turns
a packet's error back into the same class, code, type and data on the calling node.
"""

from __future__ import annotations

from typing import Any

from moleculerpy.errors import MoleculerClientError, MoleculerError, ValidationError

MAX_MESSAGE = 1000
"""Characters of an error message (and of a field name in its data) that reach the caller."""


class CqrsError(Exception):
    """Root of every error raised by moleculerpy-cqrs (a marker; catch this one)."""


class InvalidInput(CqrsError, ValidationError):
    """Bad input: nothing was changed. Code 422, named ``ValidationError`` on the wire."""

    wire_name = "ValidationError"

    def __init__(self, message: str, *, field: str | None = None, got: Any = None) -> None:
        data: dict[str, Any] = {}
        if got is not None:
            data["got"] = _short(got)
        # A message quotes what was sent (a field name, say): keep it readable, and small.
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        if field is not None and len(field) > MAX_MESSAGE:
            field = field[:MAX_MESSAGE] + "..."
        ValidationError.__init__(self, message, field=field, data=data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["name"] = self.wire_name
        return out

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> InvalidInput:
        error = cls(message, field=data.get("field"))
        error.data = dict(data)
        return error


class EntityNotFoundError(CqrsError, MoleculerClientError):
    """No row with the given id: moleculer-db's ``EntityNotFoundError``, shaped as moleculer-db
    shapes it (code 404, ``type`` null, ``data`` ``{id}``); the store is named in the message."""

    type: str | None  # type: ignore[assignment]  # moleculer-db's is null

    def __init__(self, entity_id: Any, *, store: str | None = None) -> None:
        self.entity_id = entity_id
        self.store = store
        where = f" in {store!r}" if store else ""
        MoleculerClientError.__init__(
            self,
            f"Entity not found: no row with id {_short(entity_id)!r}{where}",
            code=404,
            data={"id": _short(entity_id)},
        )
        self.type = None

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> EntityNotFoundError:
        error = cls(data.get("id"))
        error.message = message
        error.args = (message,)
        return error


EntityNotFound = EntityNotFoundError
"""The name this error had before 0.2 (kept so that ``except EntityNotFound`` goes on working)."""


class ConflictError(CqrsError, MoleculerClientError):
    """The operation clashes with the current state (code 409)."""

    def __init__(self, message: str, **data: Any) -> None:
        MoleculerClientError.__init__(self, message, code=409, type="CONFLICT", data=data)

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> ConflictError:
        return cls(message, **data)


Conflict = ConflictError
"""The name this error had before 0.2."""


class ReadOnlyAggregateError(CqrsError, MoleculerClientError):
    """A write action (create, insert, update, remove) on an aggregate that only its projector
    writes (code 405, "method not allowed": the action exists, this aggregate refuses it)."""

    def __init__(self, aggregate: str, action: str) -> None:
        MoleculerClientError.__init__(
            self,
            f"{aggregate}.{action} is refused: only the projector writes {aggregate!r}, from the "
            "event log, and a replay would drop a row written here. Change data by sending a "
            "command through EventStore.map_action (its transformations update the aggregate); "
            "to allow direct writes build it with Aggregate(..., write_actions=True)",
            code=405,
            type="READ_ONLY_AGGREGATE",
            data={"aggregate": aggregate, "action": action},
        )

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> ReadOnlyAggregateError:
        return cls(str(data.get("aggregate")), str(data.get("action")))


class ResponseTooLargeError(CqrsError, MoleculerClientError):
    """An answer larger than the transporter carries (code 413): ask for less of it."""

    def __init__(self, action: str, size: int | None, limit: int | None) -> None:
        measured = f" is {size} bytes," if size is not None else ""
        most = f"at most {limit} bytes" if limit is not None else "a smaller answer"
        MoleculerClientError.__init__(
            self,
            f"the answer of {action}{measured} too large for the transporter ({most}): ask "
            "for less at once, e.g. find with limit and offset, list with page and pageSize, "
            "or only the fields you need",
            code=413,
            type="RESPONSE_TOO_LARGE",
            data={"action": action, "size": size, "limit": limit},
        )

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> ResponseTooLargeError:
        size, limit = data.get("size"), data.get("limit")
        return cls(
            str(data.get("action")),
            size if isinstance(size, int) else None,
            limit if isinstance(limit, int) else None,
        )


class StoreError(CqrsError, MoleculerError):
    """A backend failed (driver error, I/O). Raised ``from`` the driver's own error."""

    def __init__(self, message: str, *, store: str | None = None) -> None:
        self.store = store
        MoleculerError.__init__(
            self, message, code=500, error_type="STORE_ERROR", data={"store": store}
        )

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> StoreError:
        return cls(message, store=data.get("store"))


class ConfigurationError(CqrsError, MoleculerError):
    """The toolkit was set up wrongly (a programming error, not bad input)."""

    def __init__(self, message: str) -> None:
        MoleculerError.__init__(self, message, code=500, error_type="CQRS_CONFIGURATION")

    @classmethod
    def from_wire(cls, message: str, data: dict[str, Any]) -> ConfigurationError:
        return cls(message)


_BY_WIRE_NAME: dict[str, Any] = {
    "ValidationError": InvalidInput,
    "EntityNotFoundError": EntityNotFoundError,
    "ConflictError": ConflictError,
    "ReadOnlyAggregateError": ReadOnlyAggregateError,
    "ResponseTooLargeError": ResponseTooLargeError,
    "StoreError": StoreError,
    "ConfigurationError": ConfigurationError,
}


def restore(plain: dict[str, Any]) -> MoleculerError | None:
    """The error of ours that an error packet's ``error`` describes, rebuilt with the same
    class, code, type and data as where it was raised; None if it is not one of ours.

    A ``ValidationError`` from any node (MoleculerPy's own or Moleculer.js's) comes back as
    :class:`InvalidInput`, which is a MoleculerPy ``ValidationError`` too.
    """
    kind = _BY_WIRE_NAME.get(str(plain.get("name")))
    data = plain.get("data")
    if kind is None or not isinstance(data, dict):
        return None
    message = str(plain.get("message") or "")
    try:
        error: MoleculerError = kind.from_wire(message, data)
    except Exception:
        return None
    error.message = message
    error.args = (message,)
    return error


def _short(value: Any, limit: int = 200) -> Any:
    try:
        text = repr(value)
    except RecursionError:
        return "(nested too deeply to show)"
    return value if len(text) <= limit else text[:limit] + "..."
