"""Writing traces: the binary encoding (header, checked blocks) or JSON Lines.

The format itself (magic, header, blocks, records) is specified in trace/file.py and
docs/trace-format.md; this module only produces it.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import IO, Any, Self

from hekitrace.errors import TraceFormatError
from hekitrace.state.events import NAME_OF, Event
from hekitrace.trace.binary import encode_event
from hekitrace.trace.file import (
    _BLOCK_HEAD,
    _FILE_HEAD,
    DEFAULT_BLOCK_BYTES,
    FORMAT_VERSION,
    MAGIC,
    MAX_BLOCK_BYTES,
    SYNC,
    TraceHeader,
)
from hekitrace.trace.jsonl import event_to_json_line
from hekitrace.trace.private_files import PRIVATE_FILE_MODE, open_private


class TraceWriter:
    """Writes a trace (binary by default, or ``encoding="jsonl"``) to a path or file.

    Binary events are collected into blocks of about ``block_bytes`` and written whole,
    so a reader never sees a half-written block except after a crash (which it reports
    and skips). ``flush()`` ends the current block; ``fsync()`` also makes it durable
    (the journal decides how often). ``append=True`` on an existing binary trace adds
    blocks after its end without a second header (journal segments); a torn tail left by
    a crash is then reported once by readers and everything after it still reads. A file
    the writer creates gets ``file_mode`` (0600: traces hold VM names, pids and memory
    maps); an existing file keeps its mode.
    """

    def __init__(self, target: str | os.PathLike | IO[bytes], header: TraceHeader | None = None,
                 *, encoding: str = "binary", block_bytes: int = DEFAULT_BLOCK_BYTES,
                 append: bool = False, file_mode: int = PRIVATE_FILE_MODE) -> None:
        if encoding not in ("binary", "jsonl"):
            raise TraceFormatError(f"unknown trace encoding {encoding!r}; "
                                   "expected 'binary' or 'jsonl'")
        self.encoding = encoding
        self.header = header or TraceHeader()
        self.block_bytes = max(256, min(block_bytes, MAX_BLOCK_BYTES // 2))
        self.bytes_written = 0
        self.events_written = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._owns = not hasattr(target, "write")
        if self._owns:
            path = os.fspath(target)  # type: ignore[arg-type]
            exists = append and os.path.exists(path) and os.path.getsize(path) > 0
            if exists and encoding == "binary":
                with open(path, "rb") as probe:
                    if probe.read(len(MAGIC)) != MAGIC:
                        raise TraceFormatError("cannot append: not a binary hekitrace trace",
                                               path=path, offset=0)
            self._file: IO[bytes] = open_private(path, append=append, mode=file_mode)
            self.path = path
        else:
            exists = append
            self._file = target  # type: ignore[assignment]
            self.path = getattr(target, "name", "<stream>")
        if not exists:
            self._write_header()

    def _write_header(self) -> None:
        if self.encoding == "jsonl":
            line = {"kind": "header", "format": "hekitrace-trace"}
            line.update(self.header.to_dict())
            self._raw(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            return
        blob = json.dumps(self.header.to_dict(), sort_keys=True).encode()
        self._raw(_FILE_HEAD.pack(MAGIC, FORMAT_VERSION, 0, len(blob), zlib.crc32(blob)) + blob)

    def _raw(self, data: bytes) -> None:
        self._file.write(data)
        self.bytes_written += len(data)

    def write(self, event: Event) -> None:
        """Add one event (buffered until the block is full or :meth:`flush`)."""
        if self.encoding == "jsonl":
            self._raw(event_to_json_line(event).encode() + b"\n")
        else:
            record = encode_event(event)
            if len(record) > MAX_BLOCK_BYTES - _BLOCK_HEAD.size:
                raise TraceFormatError(f"{NAME_OF[type(event)]} event of {len(record)} bytes "
                                       f"exceeds the {MAX_BLOCK_BYTES}-byte block limit",
                                       path=self.path)
            self._pending.append(record)
            self._pending_bytes += len(record)
            if self._pending_bytes >= self.block_bytes:
                self._end_block()
        self.events_written += 1

    def write_all(self, events: Any) -> None:
        for event in events:
            self.write(event)

    def _end_block(self) -> None:
        if not self._pending:
            return
        payload = b"".join(self._pending)
        self._raw(_BLOCK_HEAD.pack(SYNC, len(payload), len(self._pending), zlib.crc32(payload))
                  + payload)
        self._pending = []
        self._pending_bytes = 0

    def flush(self) -> None:
        """Write the pending events as a whole block and flush the file object."""
        self._end_block()
        self._file.flush()

    def fsync(self) -> None:
        """:meth:`flush`, then make the bytes durable (``os.fsync``)."""
        self.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        if self._owns:
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading -------------------------------------------------------------------------------


def write_events(path: str | os.PathLike, events: Any, header: TraceHeader | None = None,
                 *, encoding: str = "binary") -> int:
    """Write ``events`` to a new trace at ``path``; returns the number written."""
    with TraceWriter(path, header, encoding=encoding) as writer:
        writer.write_all(events)
        return writer.events_written
