"""The backup file layout every backend writes and reads.

A backup of table ``t`` in a folder is two files:

- ``t.rows``: the rows with their ids, in the bulk form of the backend that wrote it
  (:data:`ROWS_FORMATS`: JSON lines for memory, a SQLite file for SQLite, COPY text for
  PostgreSQL), so that a backup costs what the database's own bulk copy costs;
- ``t.manifest.json``: the :class:`Manifest`, the same for every backend: the format and its
  version, the table, its fields, the last id handed out, the meta values, and the rows
  file's row count, size and SHA-256.

Both are written under a temporary name, synced and renamed (:func:`write_atomically`, and
:class:`RowsWriter` for rows written as they stream), the manifest last, so a crash leaves the
old backup or the new one. A restore reads the manifest first (:func:`read_manifest`) and
checks the rows against it before anything is changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Buffer, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

from moleculerpy_cqrs.errors import ConfigurationError, StoreError
from moleculerpy_cqrs.stores.encoding import decode_json, encode_json
from moleculerpy_cqrs.stores.fields import FieldType, check_value, declare_fields

FORMAT: Final = "moleculerpy-cqrs backup"
VERSION: Final = 2
type RowsFormat = Literal["json-lines", "sqlite", "pg-copy-text"]
ROWS_FORMATS: Final[frozenset[str]] = frozenset({"json-lines", "sqlite", "pg-copy-text"})
CHUNK: Final = 1 << 20


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a temporary file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BackupFiles:
    """Where the backup of one table lives in a folder."""

    rows: Path
    manifest: Path

    @classmethod
    def of(cls, location: str, table: str) -> BackupFiles:
        folder = Path(location)
        return cls(folder / f"{table}.rows", folder / f"{table}.manifest.json")


@dataclass(frozen=True)
class Manifest:
    """What a backup holds, beside its rows file."""

    rows_format: RowsFormat
    table: str
    fields: dict[str, FieldType]
    """Each field's declared type, in column order (``id`` comes first, not named)."""
    sequence: int
    """The last id the table handed out: ids after a restore go past it."""
    meta: dict[str, str]
    """Each meta value as its stored JSON text."""
    rows: int
    size: int
    """The rows file's length in bytes."""
    sha256: str

    def to_bytes(self) -> bytes:
        return encode_json({"format": FORMAT, "version": VERSION, **asdict(self)}).encode()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """The manifest in ``data``; :class:`ValueError` saying what is wrong with it."""
        document = decode_json(data)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("it is not a moleculerpy-cqrs backup")
        if document.get("version") != VERSION:
            raise ValueError(f"its version {document.get('version')!r} is not {VERSION}")
        shape: dict[str, type] = {
            "rows_format": str,
            "table": str,
            "fields": dict,
            "sequence": int,
            "meta": dict,
            "rows": int,
            "size": int,
            "sha256": str,
        }
        for key, kind in shape.items():
            if not isinstance(document.get(key), kind) or isinstance(document[key], bool):
                raise ValueError(f"its manifest has no valid {key!r}")
        if document["rows_format"] not in ROWS_FORMATS:
            raise ValueError(f"its rows are in an unknown form {document['rows_format']!r}")
        document["fields"] = declare_fields(document["fields"])
        for text in document["meta"].values():
            if not isinstance(text, str):
                raise ValueError("its meta is not a map of JSON texts")
            decode_json(text)
        return cls(**{key: document[key] for key in shape})


def read_manifest(
    location: str,
    table: str,
    fields: Mapping[str, FieldType],
    rows_format: RowsFormat,
) -> tuple[BackupFiles, Manifest]:
    """The backup of ``table`` in ``location``, checked to fit a table of ``fields`` and to be
    whole (its rows file has the size the manifest says); raises :class:`StoreError` ("no
    backup" or "damaged") otherwise. Blocking: call it in a thread."""
    files = BackupFiles.of(location, table)
    try:
        manifest = Manifest.parse(files.manifest.read_bytes())
        size = files.rows.stat().st_size
    except FileNotFoundError as e:
        raise StoreError(
            f"no backup of {table!r} in {location!r}: {Path(e.filename or '').name} is missing",
            store=table,
        ) from e
    except (OSError, ValueError, TypeError, ConfigurationError) as e:
        raise damaged(table, location, str(e)) from e
    if manifest.rows_format != rows_format:
        raise damaged(
            table, location, f"its rows are {manifest.rows_format}, this store reads {rows_format}"
        )
    for name, kind in manifest.fields.items():
        if fields.get(name) != kind:
            raise damaged(table, location, f"its field {name!r} ({kind}) is not declared so here")
    if size != manifest.size:
        why = f"{files.rows.name} has {size} bytes, its manifest says {manifest.size}"
        raise damaged(table, location, why)
    return files, manifest


def damaged(table: str, location: str, why: str) -> StoreError:
    return StoreError(f"the backup of {table!r} in {location!r} is damaged: {why}", store=table)


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


class RowsWriter:
    """A rows file written as it streams: to a temporary name, hashed and counted on the way
    (one row a line), renamed into place by :meth:`finish`. Chunks are buffered in memory
    (:meth:`add`); :meth:`flush` and :meth:`finish` do the blocking writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.buffer = bytearray()
        self.hasher = hashlib.sha256()
        self.size = 0
        self.count = 0
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.tmp.open("wb")

    def add(self, chunk: Buffer) -> bool:
        """Buffer a chunk; answers whether the buffer wants flushing."""
        self.buffer += chunk
        return len(self.buffer) >= CHUNK

    def flush(self) -> None:
        assert self._file is not None
        data = bytes(self.buffer)
        self.buffer.clear()
        self._file.write(data)
        self.hasher.update(data)
        self.size += len(data)
        self.count += data.count(b"\n")  # both line forms escape newlines inside values

    def finish(self) -> None:
        assert self._file is not None
        self.flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def json_lines(rows: list[list[Any]]) -> bytes:
    """Rows (``[id, *values]``, values as plain JSON) as JSON lines."""
    return "".join(encode_json(row) + "\n" for row in rows).encode()


def parse_json_lines(
    data: bytes, manifest: Manifest, fields: Mapping[str, FieldType]
) -> list[list[Any]]:
    """The rows of a JSON-lines rows file, each value checked as its field's type; raises
    :class:`ValueError` when they do not match ``manifest`` (hash, count, shape)."""
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise ValueError("its rows do not match its manifest")
    kinds = [fields[name] for name in manifest.fields]
    rows: list[list[Any]] = []
    last = 0
    for line in data.splitlines():
        values = decode_json(line)
        if not isinstance(values, list) or len(values) != len(kinds) + 1:
            raise ValueError("a row has the wrong number of values")
        entity_id = values[0]
        if type(entity_id) is not int or entity_id <= last:
            raise ValueError("row ids are not increasing integers")
        last = entity_id
        checked = [
            check_value(name, kind, value)
            for name, kind, value in zip(manifest.fields, kinds, values[1:], strict=True)
        ]
        rows.append([entity_id, *checked])
    if len(rows) != manifest.rows:
        raise ValueError(f"it holds {len(rows)} rows of {manifest.rows}")
    return rows


def write_backup(files: BackupFiles, rows: bytes, manifest: Manifest) -> int:
    """Write a backup whose rows are all in memory (rows first, the manifest last); answers
    the bytes written. Blocking: call it in a thread."""
    write_atomically(files.rows, rows)
    return len(rows) + write_manifest(files, manifest)


def write_manifest(files: BackupFiles, manifest: Manifest) -> int:
    """Write the manifest, once its rows file is in place; answers its size."""
    data = manifest.to_bytes()
    write_atomically(files.manifest, data)
    return len(data)
