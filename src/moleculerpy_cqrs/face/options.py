"""Checks of the command line's values: each bad one is a :class:`BadOption` whose message says
what to give instead, in one line (the ``cqrs`` command prints it and exits with code 2)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

TRANSPORTERS: Final = ("nats", "redis", "mqtt", "amqp", "kafka", "tcp", "memory")
"""The schemes MoleculerPy 0.14.22 has a transporter for (only nats and memory are tested here)."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

_NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BadOption(ValueError):
    """A value the command cannot use; the message says what to give instead."""

    def __init__(self, option: str, got: object, wanted: str) -> None:
        self.option, self.got, self.wanted = option, got, wanted
        super().__init__(f"{option} {got!r}: {wanted}")


def transporter(url: str, option: str = "--transporter") -> str:
    """A transporter URL MoleculerPy can use: ``memory://``, or ``SCHEME://HOST[:PORT]``."""
    wanted = (
        "give a URL such as nats://127.0.0.1:4222 (schemes: "
        + ", ".join(f"{s}://" for s in TRANSPORTERS)
        + ")"
    )
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # a port that is not a number raises here
    except ValueError:
        raise BadOption(option, url, wanted) from None
    if "://" not in url or parts.scheme.lower() not in TRANSPORTERS:
        raise BadOption(option, url, wanted)
    if parts.scheme.lower() != "memory" and not parts.hostname:
        raise BadOption(option, url, wanted)
    if port == 0:
        raise BadOption(option, url, wanted)
    return url.strip()


def node_id(value: str, option: str = "--node-id") -> str:
    """A node id the transporters can carry (it becomes part of NATS subjects)."""
    if not _NODE_ID.fullmatch(value):
        raise BadOption(
            option,
            value,
            "give letters, digits, '.', '_' or '-' (starting with a letter or digit, "
            "at most 128), e.g. node-1",
        )
    return value


def log_level(value: str, option: str = "--log-level") -> str:
    if value.lower() not in LOG_LEVELS:
        raise BadOption(option, value, "give one of " + ", ".join(LOG_LEVELS))
    return value.lower()


def writable_folder(path: Path, option: str = "--data") -> Path:
    """``path`` as a folder this process can write files in (made if missing)."""
    wanted = "give a folder this user can create and write files in"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise BadOption(option, str(path), f"{reason}; {wanted}") from None
    return path


def at_least(value: int, minimum: int, option: str) -> int:
    if value < minimum:
        raise BadOption(option, value, f"give a whole number >= {minimum}")
    return value
