"""Recovery at start-up: latest valid checkpoint, the journal after it, then reality.

The daemon's ``recovery`` seam (hekitrace/service/daemon.py) calls a :class:`JournalRecovery`
with the fresh pipeline and the VMs discovery found running. It

1. loads the newest checkpoint that passes its checksum; a corrupt or truncated one is
   reported with its name and byte offset and the next older one is tried (then none:
   the whole journal is replayed from its first segment);
2. replays every segment from the checkpoint's on, through the same pipeline the live
   events go through (so maps, counters and findings counts come out as if the daemon
   had never stopped); a damaged block is reported with its offset and skipped, and the
   reader resumes at the next good block;
3. reconciles with the VMs that exist now: a VM that is gone is destroyed (its time is
   unknown: recorded as now, with the gap as degraded reason) and retired after the
   grace period as usual; a VM still running keeps its maps but is marked degraded,
   "monitoring gap: daemon down from X to Y", because the KVM attribute xarray of
   another process cannot be read back from userspace; VMs that appeared meanwhile are
   left to the daemon, which registers them "running before monitoring started";
4. starts the :class:`~hekitrace.journal.segments.Journal` with a checkpoint of the result.

Nothing here ends the daemon: an unreadable directory or file is reported and recovery
continues with what it has (the gap is then explicit in the degraded reasons).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from hekitrace.errors import TraceFormatError
from hekitrace.journal import checkpoint
from hekitrace.journal.segments import Journal, scan
from hekitrace.state.changes import VmKey
from hekitrace.state.events import VmCreated, VmDestroyed
from hekitrace.trace.file import TraceHeader, TraceReader

#: problems reported one line each; beyond this only counted (a shredded file must not
#: flood the log)
MAX_PROBLEM_LINES = 20


#: a recovered VM whose VMM process exists but which start-up discovery did not report
NOT_DISCOVERED_REASON = "not found by start-up discovery although its VMM process exists"
#: no valid checkpoint and the first segments deleted: history before them is unknown
INCOMPLETE_REASON = "journal incomplete: no valid checkpoint, oldest segments deleted"


def gap_reason(down_ns: int, up_ns: int) -> str:
    return f"monitoring gap: daemon down from {_iso(down_ns)} to {_iso(up_ns)}"


def gone_reason(down_ns: int, up_ns: int) -> str:
    return (f"destroyed while the daemon was down (between {_iso(down_ns)} and "
            f"{_iso(up_ns)})")


def _stderr_say(message: str) -> None:
    print(f"hekitrace: {message}", file=sys.stderr, flush=True)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Report(NamedTuple):
    """What a recovery did, for the log, ``status`` and tests."""

    checkpoint: str | None          # path of the checkpoint used
    rejected: list[str]             # checkpoints skipped, with why
    segments: list[str]             # segments replayed
    events: int                     # events replayed
    problems: int                   # damaged blocks / unreadable segments
    down_ns: int                    # last sign of life of the previous run (0: none)
    covered: set                    # VmKeys still running
    gone: list                      # VmKeys destroyed while down


def load_checkpoint(directory: str, pipeline: Any, say: Callable[[str], None]
                    ) -> tuple[checkpoint.Checkpoint | None, str | None, list[str]]:
    """Restore the newest valid checkpoint of ``directory`` into ``pipeline``."""
    rejected: list[str] = []
    for _seq, path in reversed(scan(directory).checkpoints):
        try:
            with open(path, "rb") as f:
                data = f.read()
            ckpt = checkpoint.decode(data, path)
            checkpoint.restore(pipeline, ckpt.state, path)
        except (OSError, TraceFormatError) as error:
            why = str(error) if isinstance(error, TraceFormatError) else f"{path}: {error}"
            rejected.append(why)
            say(f"WARNING: journal: skipping checkpoint: {why}; falling back to the "
                "previous checkpoint plus the journal")
            continue
        return ckpt, path, rejected
    return None, None, rejected


def replay(pipeline: Any, directory: str, first_segment: int,
           say: Callable[[str], None]) -> tuple[list[str], int, int, int]:
    """Feed segments >= ``first_segment``; returns (paths, events, problems, last_ns)."""
    paths, events, problems, last_ns = [], 0, 0, 0

    def report(problem: Any) -> None:
        nonlocal problems
        problems += 1
        if problems <= MAX_PROBLEM_LINES:
            say(f"WARNING: journal: {problem}; skipped, reading on")

    for seq, path in scan(directory).segments:
        if seq < first_segment:
            continue
        try:
            reader = TraceReader(path, report)
        except TraceFormatError as error:
            # e.g. a segment created just before a crash, header not yet written
            report(error)
            continue
        paths.append(path)
        for batch in reader.batches():
            pipeline.feed_many(batch)
            events += len(batch)
            last_ns = max(last_ns, batch[-1].time_ns)
    if problems > MAX_PROBLEM_LINES:
        say(f"WARNING: journal: {problems - MAX_PROBLEM_LINES} more problems not shown")
    return paths, events, problems, last_ns


def _last_write_ns(directory: str) -> int:
    listing = scan(directory)
    newest = 0
    for _seq, path in listing.segments[-1:] + listing.checkpoints[-1:]:
        try:
            newest = max(newest, os.stat(path).st_mtime_ns)
        except OSError:
            pass
    return newest


def reconcile(pipeline: Any, discovered: list[VmCreated], down_ns: int, up_ns: int,
              proc_root: str = "/proc") -> tuple[set[VmKey], list[VmKey]]:
    """Mark running VMs with the gap and destroy the ones that are gone.

    A VM that discovery did not report but whose VMM process still exists is kept (with
    the gap and a second reason): discovery may have failed or been unavailable, and
    destroying a live VM's maps on a guess would blind us for the rest of its life.
    """
    running = {e.tgid for e in discovered}
    host = pipeline.host
    covered: set[VmKey] = set()
    gone: list[VmKey] = []
    for guest in host.live_guests():
        if guest.pid in running:
            change = host.mark_degraded(guest.key, gap_reason(down_ns, up_ns))
            pipeline.policy.evaluate(change, host)  # counts map_degraded like a live gap
            covered.add(guest.key)
        elif os.path.exists(os.path.join(proc_root, str(guest.pid))):
            pipeline.policy.evaluate(host.mark_degraded(guest.key, gap_reason(down_ns, up_ns)),
                                     host)
            host.mark_degraded(guest.key, NOT_DISCOVERED_REASON)
        else:
            key = guest.key
            pipeline.feed(VmDestroyed(up_ns, guest.pid, guest.pid, ""))
            pipeline.policy.evaluate(host.mark_degraded(key, gone_reason(down_ns, up_ns)),
                                     host)
            gone.append(key)
    return covered, gone


class JournalRecovery:
    """The daemon's ``recovery`` seam backed by the journal directory of ``config``.

    After the call, ``journal`` is the running :class:`Journal` (the daemon flushes it
    after each batch and exports its health) and ``report`` says what was recovered.
    """

    def __init__(self, config: Any, say: Callable[[str], None] | None = None, *,
                 wall_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
                 proc_root: str = "/proc") -> None:
        self.config = config
        self._proc_root = proc_root
        self._say = say or _stderr_say
        self._wall_ns = wall_ns
        self._mono = monotonic
        self.journal: Journal | None = None
        self.report: Report | None = None

    def __call__(self, pipeline: Any, discovered: list[VmCreated]) -> set:
        directory = str(self.config.journal.directory)
        try:
            covered = self._recover(pipeline, discovered, directory)
        except Exception:  # noqa: BLE001 - a bug here must not become a crash loop
            # Start from an empty state rather than not at all: the running VMs are then
            # registered "running before monitoring started" by the daemon, which is
            # true for what we can vouch for. The journal files stay for forensics.
            self._say("ERROR: journal: recovery failed (please report); starting from an "
                      "empty state, the journal files are kept:\n"
                      + traceback.format_exc().rstrip())
            _reset(pipeline)
            covered = set()
        self._start_journal(pipeline, directory)
        return covered

    def _recover(self, pipeline: Any, discovered: list[VmCreated], directory: str) -> set:
        say = self._say
        started = self._mono()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as error:
            say(f"ERROR: journal: cannot create {directory}: {error}; nothing recovered")
        down_ns = _last_write_ns(directory)
        ckpt, path, rejected = load_checkpoint(directory, pipeline, say)
        listing = scan(directory)
        first = ckpt.segment if ckpt is not None else 0
        incomplete = ckpt is None and bool(listing.segments) and listing.segments[0][0] > 1
        if incomplete:
            say("WARNING: journal: no valid checkpoint and the oldest segments were "
                "deleted by retention: the recovered state is incomplete")
        segments, events, problems, last_ns = replay(pipeline, directory, first, say)
        if incomplete:
            for guest in pipeline.host.guests.values():
                guest.add_degraded(INCOMPLETE_REASON)
        down_ns = max(down_ns, last_ns, ckpt.time_ns if ckpt is not None else 0)
        up_ns = self._wall_ns()
        covered: set[VmKey] = set()
        gone: list[VmKey] = []
        if ckpt is not None or segments:
            covered, gone = reconcile(pipeline, discovered, down_ns, up_ns, self._proc_root)
        self.report = Report(path, rejected, segments, events, problems, down_ns, covered,
                             gone)
        if ckpt is not None or segments:
            say(f"journal: recovered from {os.path.basename(path) if path else 'no checkpoint'}"
                f" + {len(segments)} segments ({events} events, {problems} problems) in "
                f"{self._mono() - started:.2f} s: {len(covered)} VMs still running "
                f"(degraded: monitoring gap from {_iso(down_ns)} to {_iso(up_ns)}), "
                f"{len(gone)} gone")
        else:
            say(f"journal: none in {directory}; starting empty")
        return covered

    def _start_journal(self, pipeline: Any, directory: str) -> None:
        say = self._say
        abi = self.config.abi_profile()
        header = TraceHeader(kernel_release=os.uname().release,
                             abi_profile=getattr(abi, "name", "") or str(
                                 getattr(self.config.abi, "profile", "")),
                             start_time_ns=self._wall_ns(), hostname=socket.gethostname(),
                             # replay honours the recording host's MBEC (commands/replay.py)
                             extra={"journal": True, "mbec": bool(abi.mbec)})

        def make_checkpoint(segment: int, time_ns: int) -> bytes:
            return checkpoint.encode(segment, time_ns, checkpoint.capture_state(pipeline))

        # a directory that cannot be written is reported by the journal itself
        # (unhealthy, errors counted, retried every second), never fatal
        self.journal = Journal(self.config.journal, make_checkpoint, header=header, say=say,
                               wall_ns=self._wall_ns, monotonic=self._mono)
        self.journal.start(pipeline)


def _reset(pipeline: Any) -> None:
    """Empty a partly restored pipeline (after a failed recovery)."""
    pipeline.host.guests.clear()
    pipeline.host._live.clear()
    pipeline.policy.counts.clear()
    pipeline.lost.clear()
    for cls in pipeline._by_type:
        pipeline._by_type[cls] = 0
