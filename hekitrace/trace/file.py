"""Trace files: the on-disk form of an event stream, in a binary and a JSON Lines encoding.

``hekitrace record``, the daemon's journal, ``hekitrace simulate`` and the bundled examples
write traces; ``hekitrace replay`` and journal recovery read them. Both encodings carry
exactly the events of :mod:`hekitrace.state.events`, so a replay feeds the daemon's pipeline
the same values it saw live (docs/internals.md, principle 1). The reader detects the encoding from
the first bytes. docs/trace-format.md is the user-facing specification.

Binary encoding (all integers little-endian)::

    file   = header block*
    header = magic "\\x89HKT\\r\\n\\x1a\\n" | u16 version | u16 reserved | u32 json_len
             | u32 crc32(json) | json (host facts: kernel_release, abi_profile,
             start_time_ns, hostname, extra)
    block  = sync "\\xf5HKBLK\\x0a\\x00" | u32 payload_len | u32 records | u32 crc32(payload)
             | payload
    record = u8 kind | u32 body_len | body   (fixed struct per kind, then
             length-prefixed parts: u16 + UTF-8 for strings, u32 count + 3 x u64 for entries)

Why blocks: a crash or a full disk leaves at most one torn block, and a flipped bit spoils
one block. Each block is checked on its own, and after a bad one the reader scans for the
next sync marker, so everything valid before *and* after damage is still read. The marker
starts with a byte (0xf5) never produced by UTF-8 text and the payload CRC rejects a false
sync found inside data. Blocks are bounded (:data:`MAX_BLOCK_BYTES`), so reading needs
constant memory. The per-record ``body_len`` lets a reader skip a kind it does not know.

JSON Lines encoding: an optional header line ``{"kind": "header", ...}`` then one event
per line, field names of :mod:`hekitrace.state.events`; blank lines and lines starting with
``#`` are ignored so scenarios can be written and commented by hand.

Problems (a bad block, a bad line) never end the read and are never dropped: each becomes
a :class:`TraceProblem` handed to the caller's ``errors`` list or callback. Only a file
that is not a trace at all raises :class:`~hekitrace.errors.TraceFormatError`.

This module is the file around the events: header, blocks, lines, damage and recovery.
What one event looks like inside a block is :mod:`hekitrace.trace.binary`'s (the hot
decoder), on one line :mod:`hekitrace.trace.jsonl`'s; neither codec imports this module.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

from hekitrace.config.limits import (
    MAX_JSON_DEPTH,
    MAX_JSONL_LINE_BYTES,
    MAX_TRACE_PROBE_BYTES,
    loads_bounded,
)
from hekitrace.errors import TraceFormatError
from hekitrace.state.events import Event
from hekitrace.trace.binary import decode_block
from hekitrace.trace.jsonl import event_from_dict, parse_int, parse_time

MAGIC = b"\x89HKT\r\n\x1a\n"
FORMAT_VERSION = 1
SYNC = b"\xf5HKBLK\n\x00"
_FILE_HEAD = struct.Struct("<8sHHII")        # magic, version, reserved, json_len, crc
_BLOCK_HEAD = struct.Struct("<8sIII")        # sync, payload_len, records, crc32
#: a block larger than this is corrupt (the writer never exceeds it): bounds reader memory
MAX_BLOCK_BYTES = 16 << 20
MAX_HEADER_BYTES = 1 << 20
DEFAULT_BLOCK_BYTES = 64 << 10


@dataclass(frozen=True)
class TraceHeader:
    """Host facts recorded at the start of a trace (all optional for hand-written ones)."""

    kernel_release: str = ""
    abi_profile: str = ""
    start_time_ns: int = 0
    hostname: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel_release": self.kernel_release, "abi_profile": self.abi_profile,
                "start_time_ns": self.start_time_ns, "hostname": self.hostname,
                "format_version": self.format_version, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceHeader:
        start = data.get("start_time_ns", 0)
        if "start_time" in data and "start_time_ns" not in data:
            start = parse_time(data["start_time"])
        return cls(kernel_release=str(data.get("kernel_release", "")),
                   abi_profile=str(data.get("abi_profile", "")),
                   start_time_ns=parse_int(start),
                   hostname=str(data.get("hostname", "")),
                   format_version=parse_int(data.get("format_version", FORMAT_VERSION)),
                   extra=dict(data.get("extra") or {}))


class TraceProblem(NamedTuple):
    """One thing wrong in a trace: ``offset`` (bytes, binary) or ``line`` (1-based, JSON
    Lines) locates it; the reader went on after it."""

    path: str
    offset: int | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"byte {self.offset}" if self.offset is not None else f"line {self.line}"
        return f"{self.path}: {where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "line": self.line,
                "message": self.message}


ErrorSink = list | Callable[[TraceProblem], None] | None


def _sink(errors: ErrorSink) -> Callable[[TraceProblem], None]:
    if errors is None:
        def raise_problem(problem: TraceProblem) -> None:
            raise TraceFormatError(problem.message, path=problem.path,
                                   offset=problem.offset, line=problem.line)
        return raise_problem
    if isinstance(errors, list):
        return errors.append
    return errors


# -- writing -------------------------------------------------------------------------------

class TraceReader:
    """Iterates the events of one trace file, either encoding, in constant memory.

    ``errors`` receives each :class:`TraceProblem` (a list is appended to, a callable is
    called); with ``errors=None`` the first problem raises :class:`TraceFormatError`.
    The constructor reads the header, so a file that is not a trace fails right away.
    """

    def __init__(self, path: str | os.PathLike, errors: ErrorSink = None) -> None:
        self.path = os.fspath(path)
        self._report = _sink(errors)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by iteration/close()
        except OSError as error:
            raise TraceFormatError(f"cannot read the file: {error.strerror or error}",
                                   path=self.path) from None
        #: bytes already read but not yet consumed (never seek: pipes work too)
        self._pushback = b""
        self._header_size = 0
        self._line_source: Iterator[bytes | int] = iter(())
        try:
            head = self._file.read(_FILE_HEAD.size)
            if head[:len(MAGIC)] == MAGIC:
                self.encoding = "binary"
                self.header = self._binary_header(head)
            elif head[:len(MAGIC) - 2] == MAGIC[:len(MAGIC) - 2]:
                raise TraceFormatError("truncated trace header", path=self.path, offset=0)
            else:
                self.encoding = "jsonl"
                self._line_source = _bounded_lines(self._file, head, MAX_JSONL_LINE_BYTES)
                self.header = self._jsonl_header()
        except BaseException:
            self._file.close()
            raise

    def position(self) -> int:
        """Bytes of the file read so far (for progress; buffered, so slightly ahead)."""
        try:
            return self._file.tell()
        except (OSError, ValueError):      # a pipe, or a closed file
            return 0

    def _binary_header(self, head: bytes) -> TraceHeader:
        if len(head) < _FILE_HEAD.size:
            raise TraceFormatError("truncated trace header", path=self.path, offset=0)
        _, version, _, size, crc = _FILE_HEAD.unpack(head)
        if version != FORMAT_VERSION:
            raise TraceFormatError(f"trace format version {version}; this hekitrace reads "
                                   f"version {FORMAT_VERSION}", path=self.path, offset=8)
        if size > MAX_HEADER_BYTES:
            raise TraceFormatError(f"header length {size} exceeds {MAX_HEADER_BYTES}",
                                   path=self.path, offset=12)
        blob = self._file.read(size)
        self._header_size = size
        if len(blob) != size or zlib.crc32(blob) != crc:
            raise TraceFormatError("trace header is truncated or fails its checksum",
                                   path=self.path, offset=_FILE_HEAD.size)
        try:
            return TraceHeader.from_dict(json.loads(blob))
        except (ValueError, AttributeError) as error:
            raise TraceFormatError(f"bad header: {error}", path=self.path,
                                   offset=_FILE_HEAD.size) from None

    def _jsonl_header(self) -> TraceHeader:
        """Decide that the file is JSON Lines: its first content line must be a JSON
        object (a header line or an event), within the first MAX_TRACE_PROBE_BYTES (blank
        and comment lines before it included); anything else is not a trace."""
        seen: list[bytes | int] = []
        offset = 0
        expected = ("not a hekitrace trace: expected the binary magic or a JSON object "
                    "on the first line")
        for number, raw in enumerate(self._line_source, 1):
            seen.append(raw)
            if isinstance(raw, int):
                raise TraceFormatError(f"{expected}, found a line of more than "
                                       f"{MAX_JSONL_LINE_BYTES} bytes", path=self.path,
                                       offset=offset)
            if offset + len(raw) > MAX_TRACE_PROBE_BYTES:
                raise TraceFormatError(f"{expected}, found none in the first "
                                       f"{MAX_TRACE_PROBE_BYTES} bytes", path=self.path,
                                       offset=offset)
            text = raw.strip()
            if not text or text.startswith(b"#"):
                offset += len(raw)
                continue
            reason = ""
            try:
                first = loads_bounded(text, max_bytes=MAX_JSONL_LINE_BYTES,
                                      max_depth=MAX_JSON_DEPTH)
            except (ValueError, UnicodeDecodeError) as error:
                first, reason = None, f" ({_short(error)})"
            if not isinstance(first, dict):
                raise TraceFormatError(f"{expected} (line {number}){reason}",
                                       path=self.path, offset=offset)
            self._line_source = itertools.chain(seen, self._line_source)
            if first.get("kind") == "header":
                try:
                    return TraceHeader.from_dict(first)
                except (ValueError, TypeError) as error:
                    raise TraceFormatError(f"bad header: {error}", path=self.path,
                                           line=number) from None
            return TraceHeader()
        raise TraceFormatError("empty file: not a hekitrace trace", path=self.path, line=1)

    def __iter__(self) -> Iterator[Event]:
        try:
            if self.encoding == "binary":
                for block in self._blocks():
                    yield from block
            else:
                yield from self._lines()
        finally:
            self._file.close()

    def batches(self, size: int = 4096) -> Iterator[list[Event]]:
        """The same events in lists (a binary block each, or ``size`` lines): the fast
        way to feed ``Pipeline.feed_many``, without a generator step per event."""
        try:
            if self.encoding == "binary":
                yield from self._blocks()
            else:
                lines = self._lines()
                while True:
                    batch = list(itertools.islice(lines, size))
                    if not batch:
                        return
                    yield batch
        finally:
            self._file.close()

    def close(self) -> None:
        self._file.close()

    def _problem(self, message: str, *, offset: int | None = None,
                 line: int | None = None) -> None:
        self._report(TraceProblem(self.path, offset, line, message))

    def _read(self, size: int) -> bytes:
        """``size`` bytes (fewer at end of file), pushed-back bytes first."""
        if self._pushback:
            data = self._pushback[:size]
            self._pushback = self._pushback[size:]
            if len(data) < size:
                data += self._file.read(size - len(data))
            return data
        return self._file.read(size)

    def _blocks(self) -> Iterator[list[Event]]:
        read = self._read
        pos = _FILE_HEAD.size + self._header_size
        report = self._report_offset
        while True:
            head = read(_BLOCK_HEAD.size)
            if not head:
                return
            if len(head) < _BLOCK_HEAD.size:
                self._problem(f"truncated block header ({len(head)} of {_BLOCK_HEAD.size} "
                              "bytes) at the end of the file", offset=pos)
                return
            sync, size, records, crc = _BLOCK_HEAD.unpack(head)
            if sync != SYNC:
                pos = self._resync(pos, "no block sync marker", head)
                if pos < 0:
                    return
                continue
            if size > MAX_BLOCK_BYTES:
                pos = self._resync(pos, f"block length {size} exceeds {MAX_BLOCK_BYTES}",
                                   head)
                if pos < 0:
                    return
                continue
            payload = read(size)
            if len(payload) < size:
                self._problem(f"truncated block: {size} payload bytes announced, the file "
                              f"ends after {len(payload)} ({records} records lost)",
                              offset=pos)
                # a torn block may be followed by appended blocks: look for them
                pos = self._resync(pos, None, head + payload)
                if pos < 0:
                    return
                continue
            if zlib.crc32(payload) != crc:
                pos = self._resync(pos, f"block checksum mismatch ({records} records "
                                        "announced, skipped)", head + payload)
                if pos < 0:
                    return
                continue
            events = decode_block(payload, pos + _BLOCK_HEAD.size, report)
            if len(events) != records:
                self._problem(f"block announces {records} records, {len(events)} decoded",
                              offset=pos)
            pos += _BLOCK_HEAD.size + size
            yield events

    def _report_offset(self, message: str, offset: int) -> None:
        self._problem(message, offset=offset)

    def _resync(self, bad: int, message: str | None, consumed: bytes) -> int:
        """Report the damage at ``bad`` and move to the next sync marker after it.

        ``consumed`` are the bytes already read from ``bad`` on; the scan starts at their
        second byte and goes on reading 1 MiB at a time, so memory stays bounded however
        large the damaged region, and nothing is read twice (no seek: pipes work).
        Returns the marker's offset (its bytes pushed back for the next read), or -1 at
        end of file.
        """
        keep = len(SYNC) - 1
        data = consumed[1:]
        base = bad + 1
        while True:
            hit = data.find(SYNC)
            if hit >= 0:
                found = base + hit
                if message:
                    self._problem(f"{message}; skipped {found - bad} bytes to the next block "
                                  f"at byte {found}", offset=bad)
                self._pushback = data[hit:] + self._pushback
                return found
            carry = data[-keep:] if len(data) >= keep else data
            base += len(data) - len(carry)
            chunk = self._read(1 << 20)
            if not chunk:
                if message:
                    self._problem(f"{message}; no further block found", offset=bad)
                return -1
            data = carry + chunk

    def _lines(self) -> Iterator[Event]:
        start_ns = self.header.start_time_ns
        last_ns = start_ns
        loads = json.loads
        from_dict = event_from_dict
        for number, raw in enumerate(self._line_source, 1):
            if isinstance(raw, int):
                self._problem(f"line longer than the {MAX_JSONL_LINE_BYTES}-byte record limit "
                              "(line skipped)", line=number)
                continue
            text = raw.strip()
            if not text or text[:1] == b"#":
                continue
            try:
                if len(text) > 64 and text.count(b"[") + text.count(b"{") > MAX_JSON_DEPTH:
                    data = loads_bounded(text, max_bytes=MAX_JSONL_LINE_BYTES)
                else:
                    data = loads(text)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 - caught below
                if data.get("kind") == "header":
                    continue  # read by _jsonl_header (only the first one counts)
                event = from_dict(data, start_ns=start_ns, last_ns=last_ns)
            except (ValueError, UnicodeDecodeError, RecursionError) as error:
                snippet = text[:60].decode("utf-8", "replace")
                self._problem(f"{_short(error)} (line skipped: {snippet!r})", line=number)
                continue
            last_ns = event.time_ns
            yield event


def _short(error: BaseException) -> str:
    """An exception's message cut to one short line (a bad value may be megabytes)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _bounded_lines(file: IO[bytes], pending: bytes, limit: int) -> Iterator[bytes | int]:
    """The lines of ``file`` (``pending``, bytes already read, first), each at most
    ``limit`` bytes plus its newline; a longer line is yielded as an int (more than
    ``limit``) as soon as that is known, and read through in bounded chunks only when the
    caller asks for the next line, so no line is ever held whole."""
    readline = file.readline
    *complete, rest = pending.split(b"\n")
    for line in complete:
        yield line + b"\n"
    line = rest + readline(limit + 1 - len(rest)) if rest or not complete else b""
    while True:
        if not line:
            line = readline(limit + 1)
            if not line:
                return
        if len(line) > limit and not line.endswith(b"\n"):
            yield len(line)  # before reading the rest: the caller may stop here
            while True:
                chunk = readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
        else:
            yield line
        line = b""


def open_trace(path: str | os.PathLike, errors: ErrorSink = None) -> TraceReader:
    """A :class:`TraceReader` for ``path`` (header read, encoding detected)."""
    return TraceReader(path, errors)


def read_events(path: str | os.PathLike, errors: ErrorSink = None) -> Iterator[Event]:
    """The events of the trace at ``path``; see :class:`TraceReader` for ``errors``."""
    return iter(TraceReader(path, errors))
