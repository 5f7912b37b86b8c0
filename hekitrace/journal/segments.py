"""The state journal: every applied event appended to segment files, plus checkpoints.

Directory layout (``journal.directory``, /var/lib/hekitrace by default)::

    journal-000007.htrace      events, binary trace format (hekitrace/trace/file.py)
    checkpoint-000007.hkck     state before segment 7 (hekitrace/journal/checkpoint.py)

Segment numbers only grow. Every checkpoint starts a new segment, so "checkpoint N plus
segments >= N" is the whole state and no byte offsets are needed; a segment also ends
when it reaches ``segment_bytes``. A daemon that starts never appends to an old segment
(a crash may have left it torn): it opens the next number.

Durability (docs/journal.md): events are encoded as they are applied and written to the
file (the OS page cache) at the end of every batch the daemon applies, so a ``kill -9``
loses nothing the daemon had applied; ``fsync`` runs every ``fsync_interval_seconds``, so
a power failure loses at most that much. A checkpoint is written to a temporary file,
fsynced, renamed, and the directory fsynced: it is either whole or absent, never torn.

Retention: the newest two checkpoints and every segment from the older of them on are
needed (the older one is the fallback when the newest is corrupt) and are never deleted;
older segments go, oldest first, once older than ``retention_seconds`` or while the
directory exceeds ``max_bytes``.

A failing disk (ENOSPC, EIO...) never stops the daemon: the failure is counted by errno
name, the journal reports itself unhealthy, the events applied meanwhile are counted as
not journaled, and every second it tries again by writing a fresh checkpoint (which holds
those events' effects) into a new segment. The journal is a pipeline observer and never
raises into the pipeline.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from hekitrace.state.changes import NO_CHANGE, Change
from hekitrace.trace.file import TraceHeader
from hekitrace.trace.private_files import (
    PRIVATE_DIRECTORY_MODE,
    PRIVATE_FILE_MODE,
    make_directories,
)
from hekitrace.trace.writer import TraceWriter

SEGMENT_RE = re.compile(r"^journal-(\d{6,})\.htrace$")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})\.hkck$")
#: seconds between attempts to resume after a write failure
RETRY_SECONDS = 1.0
#: checkpoints kept: the newest and one fallback (a corrupt newest must not lose state)
KEEP_CHECKPOINTS = 2


def segment_name(seq: int) -> str:
    return f"journal-{seq:06d}.htrace"


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:06d}.hkck"


class Listing(NamedTuple):
    """What a journal directory holds: ``(seq, path)`` ascending for each kind."""

    segments: list[tuple[int, str]]
    checkpoints: list[tuple[int, str]]


def scan(directory: str) -> Listing:
    """The segments and checkpoints in ``directory`` (missing directory: empty)."""
    segments, checkpoints = [], []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            segments.append((int(m.group(1)), os.path.join(directory, name)))
            continue
        m = CHECKPOINT_RE.match(name)
        if m:
            checkpoints.append((int(m.group(1)), os.path.join(directory, name)))
    return Listing(sorted(segments), sorted(checkpoints))


def write_atomic(path: str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, whole;
    a new file gets ``mode`` (0600 unless journal.file_mode says otherwise)."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        os.fchmod(fd, mode)  # a stale .tmp left by a crash keeps its old mode otherwise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(directory: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def errno_reason(error: BaseException) -> str:
    """A bounded metric label for a write error: the errno name (``ENOSPC``...)."""
    code = getattr(error, "errno", None)
    return errno_mod.errorcode.get(code, "EIO") if code else type(error).__name__


class Journal:
    """Appends applied events to segments and writes checkpoints; see the module docstring.

    ``cfg`` is ``config.journal``; ``make_checkpoint(segment, time_ns) -> bytes`` encodes
    the current state (the recovery wires :mod:`hekitrace.journal.checkpoint` in); ``header``
    goes into every segment; ``say`` gets one-line messages; clocks are injectable.
    """

    def __init__(self, cfg: Any, make_checkpoint: Callable[[int, int], bytes], *,
                 header: TraceHeader | None = None, say: Callable[[str], None] = print,
                 wall_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.directory = str(cfg.directory)
        self._file_mode = int(getattr(cfg, "file_mode", PRIVATE_FILE_MODE))
        self._directory_mode = int(getattr(cfg, "directory_mode", PRIVATE_DIRECTORY_MODE))
        self._make_checkpoint = make_checkpoint
        self._header = header or TraceHeader()
        self._say = say
        self._wall_ns = wall_ns
        self._mono = monotonic
        self._writer: TraceWriter | None = None
        self.segment = 0
        self.healthy = True
        self.write_errors: dict[str, int] = {}
        self.events_written = 0
        self.events_not_journaled = 0
        self.checkpoints_written = 0
        self.last_error = ""
        self.bytes = 0
        now = monotonic()
        self._next_fsync = now + float(cfg.fsync_interval_seconds)
        self._next_checkpoint = now + float(cfg.checkpoint_interval_seconds)
        self._next_retry = now

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, pipeline: Any) -> None:
        """Checkpoint the (recovered) state into a new segment and observe ``pipeline``.

        Failing here is like failing later: reported, retried, never fatal.
        """
        pipeline.add_observer(self.observe)
        self._remove_temporaries()
        if self._roll(checkpoint=True):
            self.retain()

    def close(self) -> None:
        """Clean stop: a last checkpoint, so the next start replays nothing."""
        if self._writer is not None or self.healthy:
            self._roll(checkpoint=True)
        self._close_writer()

    # -- the observer --------------------------------------------------------------------
    def observe(self, change: Change, findings: Any) -> None:
        """Pipeline observer: journal applied events; timer runs drive :meth:`tick`."""
        event = change.event
        if event is not None:
            writer = self._writer
            if writer is None:
                self.events_not_journaled += 1
                return
            try:
                writer.write(event)
                self.events_written += 1
            except OSError as error:
                self.events_not_journaled += 1
                self._fail(error, "write")
        elif change is NO_CHANGE:
            self.tick()

    def after_batch(self) -> None:
        """End of a daemon batch: hand the events to the OS (survives kill -9)."""
        writer = self._writer
        if writer is None:
            return
        try:
            writer.flush()
        except OSError as error:
            self._fail(error, "write")
            return
        if writer.bytes_written >= int(self.cfg.segment_bytes):
            self._roll(checkpoint=False)

    def tick(self) -> None:
        """Timers: fsync, checkpoint (+ retention), and retrying after a failure."""
        now = self._mono()
        if self._writer is None:
            if now >= self._next_retry:
                self._next_retry = now + RETRY_SECONDS
                if self._roll(checkpoint=True):
                    self._say(f"journal: writing again in {self.directory} "
                              f"({self.events_not_journaled} events were not journaled "
                              "meanwhile; the new checkpoint holds their effect)")
                    self.retain()
            return
        if now >= self._next_checkpoint:
            self._next_checkpoint = now + float(self.cfg.checkpoint_interval_seconds)
            if self._roll(checkpoint=True):
                self.retain()
            return
        if now >= self._next_fsync:
            self._next_fsync = now + float(self.cfg.fsync_interval_seconds)
            try:
                self._writer.fsync()
            except OSError as error:
                self._fail(error, "fsync")
        self._update_bytes()

    # -- health (metrics, status) ---------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, int], int]:
        """``(healthy, write_errors_by_reason, bytes)`` for the metrics collector."""
        return self.healthy, dict(self.write_errors), self.bytes

    def status(self) -> dict:
        return {"healthy": self.healthy, "directory": self.directory,
                "segment": segment_name(self.segment), "bytes": self.bytes,
                "events_written": self.events_written,
                "events_not_journaled": self.events_not_journaled,
                "checkpoints_written": self.checkpoints_written,
                "write_errors": dict(self.write_errors), "last_error": self.last_error}

    # -- internals -------------------------------------------------------------------------
    def _roll(self, *, checkpoint: bool) -> bool:
        """End the current segment and open the next one, checkpointing in between if
        asked. True when the journal is writing afterwards."""
        if self._writer is not None:
            try:
                self._writer.fsync()
            except OSError as error:
                self._fail(error, "fsync")
                return False
        self._close_writer()
        seq = self.segment + 1
        try:
            # never reuse a number: a previous run (or a failed start) may have used it
            make_directories(self.directory, self._directory_mode)
            listing = scan(self.directory)
            seq = max([seq] + [n + 1 for n, _ in listing.segments + listing.checkpoints])
            if checkpoint:
                data = self._make_checkpoint(seq, self._wall_ns())
                write_atomic(os.path.join(self.directory, checkpoint_name(seq)), data,
                             self._file_mode)
                self.checkpoints_written += 1
            writer = TraceWriter(os.path.join(self.directory, segment_name(seq)), self._header,
                                 file_mode=self._file_mode)
            self.segment = seq
            self._writer = writer
            writer.fsync()
            fsync_dir(self.directory)  # the new segment's name survives a power failure
        except OSError as error:
            self.segment = seq
            self._fail(error, "checkpoint" if checkpoint else "rotate")
            return False
        if not self.healthy:
            self.healthy = True
        self._update_bytes()
        return True

    def _fail(self, error: OSError, what: str) -> None:
        reason = errno_reason(error)
        self.write_errors[reason] = self.write_errors.get(reason, 0) + 1
        self.last_error = f"{what}: {reason}: {error.strerror or error}"
        if self.healthy:
            self._say(f"ERROR: journal {what} failed in {self.directory} ({reason}: "
                      f"{error.strerror or error}); the daemon keeps running, events are "
                      "not journaled until it can write again (retried every "
                      f"{RETRY_SECONDS:g} s; hekitrace_journal_healthy 0)")
        self.healthy = False
        self._close_writer()
        self._next_retry = self._mono() + RETRY_SECONDS

    def _remove_temporaries(self) -> None:
        """Checkpoint temp files a kill left behind (never renamed: never valid)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.endswith(".hkck.tmp") and CHECKPOINT_RE.match(name[:-4]):
                _unlink(os.path.join(self.directory, name))

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError:
            # the pending block could not be written (disk full): already counted
            try:
                writer._file.close()
            except OSError:
                pass

    def retain(self) -> list[str]:
        """Delete what retention allows (never what recovery needs); returns the paths."""
        listing = scan(self.directory)
        kept = listing.checkpoints[-KEEP_CHECKPOINTS:]
        needed_from = kept[0][0] if kept else 0
        removed = []
        for seq, path in listing.checkpoints[:-KEEP_CHECKPOINTS]:
            if _unlink(path):
                removed.append(path)
        sizes = []
        for seq, path in listing.segments:
            try:
                st = os.stat(path)
            except OSError:
                continue
            sizes.append((seq, path, st.st_size, st.st_mtime))
        total = sum(s[2] for s in sizes) + sum(_size(p) for _, p in kept)
        horizon = time.time() - float(self.cfg.retention_seconds)
        for seq, path, size, mtime in sizes:
            if seq >= needed_from or seq >= self.segment:
                break
            if (mtime < horizon or total > int(self.cfg.max_bytes)) and _unlink(path):
                removed.append(path)
                total -= size
        self._update_bytes()
        return removed

    def _update_bytes(self) -> None:
        total = 0
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if SEGMENT_RE.match(entry.name) or CHECKPOINT_RE.match(entry.name):
                        try:
                            total += entry.stat().st_size
                        except OSError:
                            pass
        except OSError:
            return
        self.bytes = total


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def expand_paths(paths: list[str]) -> list[str]:
    """``paths`` with each journal directory replaced by its segments, oldest first.

    For ``hekitrace replay DIR`` and ``snapshot --from DIR``: a segment is an ordinary
    trace, so replaying every segment in order rebuilds the state with its full history
    (findings and ``--at`` included) as long as retention has kept the first segment. A
    directory without segments stays as given (the reader then reports it).
    """
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            segments = [p for _, p in scan(path).segments]
            out.extend(segments or [path])
        else:
            out.append(path)
    return out
