"""Every bound hekitrace puts on what it reads and on what a configuration may ask for.

One module, so that config validation, the readers and the servers agree, and so that each
limit carries the reason it has the value it has. Two kinds:

*Input bounds* keep memory and time bounded whatever bytes arrive (``/dev/zero``, a FIFO,
a sparse file, a hostile client): every reader of untrusted bytes reads at most one of
these at a time and rejects more with one line naming the limit.

*Setting bounds* are what the kernel or the daemon can actually do with a configured
value; ``config validate`` rejects anything outside them with the file, line, key, the
allowed range and the reason (:data:`SETTING_BOUNDS`), instead of a daemon that later runs
not ready.

This module imports nothing from hekitrace but the exception tree (a leaf of the config
layer), so every layer can use it.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

# ---------------------------------------------------------------------------------------
# input bounds

#: A configuration file larger than this is not a configuration (the bundled full example
#: is under 8 KiB); it is refused before it is parsed, so /dev/zero or a huge file costs
#: at most this much memory.
MAX_CONFIG_BYTES = 1 << 20
#: Deepest YAML nesting of mappings and lists. The schema is at most 5 deep
#: (policy.exceptions[].vms.name); PyYAML's composer recurses once per level, so a
#: 10,000-deep list would otherwise end in RecursionError.
MAX_YAML_DEPTH = 32

#: The longest JSON Lines trace record. The largest real record is a protect_memory
#: request with state.max_entries_per_request (at most MAX_ENTRIES_PER_REQUEST) entries of
#: about 50 bytes each (["0x...","0x...",7]): about 200 KiB at the cap. A longer line is
#: reported and skipped in bounded chunks, never held whole.
MAX_JSONL_LINE_BYTES = 1 << 20
#: How far into a file the reader looks for the binary magic or the first JSON Lines
#: record (blank and comment lines before it included) before deciding it is not a trace.
MAX_TRACE_PROBE_BYTES = MAX_JSONL_LINE_BYTES + 4096
#: Deepest JSON nesting in a trace record or a control request. An event record is at most
#: 3 deep (object -> entries -> entry); the control protocol's requests are flat objects.
#: The C JSON parser recurses once per level (RecursionError near 1000): checked first.
MAX_JSON_DEPTH = 16

#: The metrics endpoint (hekitrace/service/http.py): one thread serves at most this many
#: connections; a scrape is one short request, so more than a handful at once is a flood.
#: Past it the oldest client still silent is evicted (counted), so a real scrape gets in.
HTTP_MAX_CONNECTIONS = 32
#: Idle and read timeout: the request head must be complete, and the reply taken, within
#: this long of the accept (Prometheus sends its request at once and reads at once).
HTTP_REQUEST_TIMEOUT_SECONDS = 5.0
#: A request head (request line and headers) larger than this gets 431: Prometheus sends
#: a few hundred bytes.
HTTP_MAX_REQUEST_BYTES = 16 * 1024
#: listen(2) backlog: a burst of connects waits in the kernel, not in SYN retries (a full
#: backlog makes a client wait a second for its SYN retransmission).
HTTP_LISTEN_BACKLOG = 1024

# ---------------------------------------------------------------------------------------
# setting bounds

#: capture.max_list_pages: the BPF verifier's limit on the page-list walk (nested bounded
#: loops: pages x memslots x already-seen pages). Measured on 6.18 with 64 memslots: 24
#: loads, 28 fails with "The sequence of 8193 jumps is too complex"
#: (hekitrace/capture/loader.py MAX_LIST_PAGES_LIMIT, tests/kernel/test_bpf_loader.py).
VERIFIER_MAX_LIST_PAGES = 24
#: BPF ring buffers (kernel/bpf/ringbuf.c ringbuf_map_alloc): max_entries is a u32 that
#: must be a power of two and a multiple of the page size; 2**31 is the largest such u32.
PAGE_SIZE = 4096
RING_BYTES_MIN = PAGE_SIZE
RING_BYTES_MAX = 1 << 31
#: capture.queue_events: the daemon's in-memory queue between the rings and the pipeline.
#: A queued event costs about 250 bytes of Python objects, so 2**22 events is about 1 GiB:
#: beyond that the queue is no bound at all.
QUEUE_EVENTS_MAX = 1 << 22
#: state.max_entries_per_request: a Heki v2 page list holds 169 entries per page and a
#: chain is at most VERIFIER_MAX_LIST_PAGES pages, so 4056 entries is the most one request
#: can carry; 65536 leaves room for other ABIs while keeping a record under
#: MAX_JSONL_LINE_BYTES / 16.
MAX_ENTRIES_PER_REQUEST = 65536
#: Timers of the daemon loop (status, fsync, checkpoint, fault report intervals): the loop
#: sleeps in epoll_wait, whose timeout is an int of milliseconds, so 2**31-1 ms (24.8 days).
MAX_TIMER_SECONDS = (2**31 - 1) / 1000
#: Windows and ages (pairing, dedup, grace, rate limit, retention): kept as int64
#: nanoseconds next to Unix-epoch times (~1.8e18 ns today), so a window must stay far below
#: 2**63 ns (292 years); ten years is more than any retention anyone means.
MAX_WINDOW_SECONDS = 10 * 365 * 86400.0
#: journal.segment_bytes / max_bytes: segment offsets are u64 but a single segment over
#: 1 TiB is a mistake (a unit slip), not a plan; the journal's total is bounded the same.
MAX_JOURNAL_BYTES = 1 << 40
#: TCP ports (metrics.listen): 16 bits; 0 asks the kernel for a free one.
PORT_MIN, PORT_MAX = 0, 65535


class Bound(NamedTuple):
    """An allowed closed range and why; ``power_of_two`` adds that constraint."""

    low: float
    high: float
    why: str
    power_of_two: bool = False

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else "low..high (why)" for the error line."""
        ok = self.low <= value <= self.high
        if ok and self.power_of_two:
            ok = int(value) & (int(value) - 1) == 0
        return None if ok else self.describe()

    def describe(self) -> str:
        """The allowed values and why, e.g. "1..24 (the BPF verifier rejects ...)"."""
        shape = "a power of two in " if self.power_of_two else ""
        return f"{shape}{_num(self.low)}..{_num(self.high)} ({self.why})"


def _num(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


_TIMER = "a daemon timer: epoll_wait takes at most 2**31-1 ms"
_WINDOW = "a window kept in int64 ns; at most ten years"

#: key (section.name) -> its bound; settings.py checks every value against this table.
SETTING_BOUNDS: dict[str, Bound] = {
    "capture.max_list_pages": Bound(1, VERIFIER_MAX_LIST_PAGES,
                                    "the BPF verifier rejects a longer page-list walk"),
    "capture.control_ring_bytes": Bound(RING_BYTES_MIN, RING_BYTES_MAX,
                                        "a BPF ring buffer: page multiple, u32 size", True),
    "capture.telemetry_ring_bytes": Bound(RING_BYTES_MIN, RING_BYTES_MAX,
                                          "a BPF ring buffer: page multiple, u32 size", True),
    "capture.fault_report_interval_seconds": Bound(0.001, MAX_TIMER_SECONDS, _TIMER),
    "capture.queue_events": Bound(1, QUEUE_EVENTS_MAX,
                                  "about 250 bytes a queued event: 1 GiB at the cap"),
    "state.grace_period_seconds": Bound(0, MAX_WINDOW_SECONDS, _WINDOW),
    "state.max_entries_per_request": Bound(1, MAX_ENTRIES_PER_REQUEST,
                                           "more than any page-list chain can carry"),
    "policy.pairing_window_seconds": Bound(0.000001, MAX_WINDOW_SECONDS, _WINDOW),
    "policy.dedup_window_seconds": Bound(0.000001, MAX_WINDOW_SECONDS, _WINDOW),
    "policy.rate_limit.per_seconds": Bound(0.000001, MAX_WINDOW_SECONDS, _WINDOW),
    "policy.rate_limit.findings": Bound(1, 2**31 - 1, "a count kept in a 32-bit metric"),
    "journal.segment_bytes": Bound(1, MAX_JOURNAL_BYTES, "1 TiB is a unit slip"),
    "journal.max_bytes": Bound(1, MAX_JOURNAL_BYTES, "1 TiB is a unit slip"),
    "journal.fsync_interval_seconds": Bound(0.001, MAX_TIMER_SECONDS, _TIMER),
    "journal.checkpoint_interval_seconds": Bound(0.001, MAX_TIMER_SECONDS, _TIMER),
    "journal.retention_seconds": Bound(1, MAX_WINDOW_SECONDS, _WINDOW),
    "daemon.status_interval_seconds": Bound(0.001, MAX_TIMER_SECONDS, _TIMER),
}


# ---------------------------------------------------------------------------------------
# bounded JSON

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text ``data`` (strings skipped);
    linear time, no recursion."""
    opens = data.count(b"[") + data.count(b"{")
    if opens == 0:
        return 0
    text = _STRING.sub(b"", data)
    depth = deepest = 0
    for char in text:
        if char in (0x5B, 0x7B):       # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif char in (0x5D, 0x7D):     # ] }
            depth -= 1
    return deepest


def loads_bounded(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH
                  ) -> Any:
    """``json.loads`` that refuses text over ``max_bytes`` or nested over ``max_depth``
    (ValueError naming the limit) before the recursive parser sees it."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ValueError(f"JSON text of {len(raw)} bytes exceeds the {max_bytes}-byte limit")
    # Only text with more brackets than the limit can be nested past it: the usual record
    # never pays for the scan.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
