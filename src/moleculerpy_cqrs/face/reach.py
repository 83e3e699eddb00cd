"""Can this transporter work? Said at once, in one line, before a node starts.

MoleculerPy's NATS client retries a refused connection, an unknown host and refused
credentials until the caller's timeout, logging a traceback each time, and a transporter
whose package is missing (or a ``tcp://`` URL without its node id) is only noticed after the
node says it is ready. :func:`check` asks the transporter's server directly instead: a TCP
connection (refused, or no address for the host), then for NATS the protocol's own handshake
(``CONNECT`` with the URL's credentials, then ``PING``), which a server that refuses the
credentials answers with ``-ERR 'Authorization Violation'`` at once. Every URL said here is
shown without its password (:func:`redact`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
from typing import Final
from urllib.parse import unquote, urlsplit

from moleculerpy_cqrs.errors import ConfigurationError

DEFAULT_PORTS: Final = {"nats": 4222, "redis": 6379, "rediss": 6379, "amqp": 5672,
                        "amqps": 5671, "mqtt": 1883, "kafka": 9092}  # fmt: skip
"""Transporters whose server is reached over TCP, and their default ports."""

PACKAGES: Final = {"redis": "redis", "amqp": "aio_pika", "mqtt": "aiomqtt", "kafka": "aiokafka"}
"""The package (import name) each transporter needs that MoleculerPy does not install."""

PIP_NAMES: Final = {"aio_pika": "aio-pika"}

PROBE_TIMEOUT: Final = 2.0

_PASSWORD: Final = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1:***@", text)


class TransporterError(ConfigurationError):
    """The transporter cannot work; the message says why and what to give instead."""


def check_usable(url: str) -> None:
    """Refuse a transporter MoleculerPy cannot run here: a missing package, or a ``tcp://``
    URL that is not an endpoint list (``tcp://HOST:PORT/NODE_ID``)."""
    for one in (part.strip() for part in url.split(",")):
        scheme = urlsplit(one).scheme.lower()
        package = PACKAGES.get(scheme)
        if package is not None and not _installed(package):
            pip = PIP_NAMES.get(package, package)
            raise TransporterError(
                f"the {scheme}:// transporter needs the {pip!r} package, which is not installed: "
                f"pip install {pip} (in a clone: .venv/bin/pip install {pip}), "
                "or use nats://HOST:4222"
            )
        node = urlsplit(one).path.strip("/")
        if scheme == "tcp" and (not node or "/" in node):
            host = urlsplit(one).netloc.rpartition("@")[2]
            raise TransporterError(
                f"{redact(one)} is not a TCP transporter endpoint: MoleculerPy's TCP "
                "transporter takes tcp://HOST:PORT/NODE_ID for each other node; for a NATS "
                f"server give nats://{host}"
            )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules as None: blocked, as good as missing
        return False


async def check(url: str, within: float = PROBE_TIMEOUT) -> None:
    """Raise :class:`TransporterError`, in one line, when the transporter cannot work: see
    the module's docstring. A server that is slow to answer is left to the broker's own
    (bounded) start."""
    check_usable(url)
    refused: list[str] = []
    for one in (part.strip() for part in url.split(",")):
        parts = urlsplit(one)
        scheme = parts.scheme.lower()
        port = DEFAULT_PORTS.get(scheme)
        if port is None or not parts.hostname:
            return  # memory://, tcp://: nothing to ask
        try:
            address = (parts.hostname, parts.port or port)
        except ValueError:
            raise TransporterError(f"{redact(one)} is not a valid transporter URL") from None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*address), min(within, PROBE_TIMEOUT)
            )
        except ConnectionRefusedError:
            refused.append(f"connection refused by {address[0]}:{address[1]} ({redact(one)})")
            continue
        except socket.gaierror:
            refused.append(f"no address for host {address[0]!r} ({redact(one)})")
            continue
        except (TimeoutError, OSError):
            return  # not refused: perhaps slow; the broker's start is bounded anyway
        try:
            if scheme == "nats":
                await _nats_handshake(reader, writer, one, min(within, PROBE_TIMEOUT))
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return
    if refused:
        raise TransporterError(
            "; ".join(refused) + ": check --transporter and that its server runs there"
        )


async def _nats_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str, within: float
) -> None:
    parts = urlsplit(url)
    try:
        info_line = await asyncio.wait_for(reader.readline(), within)
        if not info_line.startswith(b"INFO "):
            return  # not a NATS server as far as this check can tell: let the client say
        info = json.loads(info_line[5:])
        if info.get("tls_required"):
            return  # the handshake needs TLS first: left to the client
        connect: dict[str, object] = {"verbose": False, "pedantic": False, "lang": "python"}
        if parts.username is not None and parts.password is not None:
            connect["user"] = unquote(parts.username)
            connect["pass"] = unquote(parts.password)
        elif parts.username is not None:
            connect["auth_token"] = unquote(parts.username)
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), within)
    except (TimeoutError, OSError, ValueError):
        return  # slow or odd: the broker's start is bounded anyway
    if answer.startswith(b"-ERR") and b"authorization" in answer.lower():
        given = "the user and password" if parts.password is not None else "no credentials"
        if parts.password is None and parts.username is not None:
            given = "the token"
        raise TransporterError(
            f"the NATS server at {redact(url)} refused {given} (Authorization Violation): "
            "give the right user and password in the transporter's URL"
        )
