"""Checkpoints: the whole state of a :class:`~hekitrace.pipeline.Pipeline` as one checked blob.

A checkpoint lets a restarted daemon skip replaying months of journal: it holds every
guest of the :class:`~hekitrace.state.host.Host` (both attribute maps, memslots, CR pins,
counters, degraded reasons), the pipeline's event and loss counters and the policy's
findings counts, i.e. everything that metrics, ``vms`` and ``snapshot`` show. It does not
hold the policy's in-flight pairing windows and storm summaries (seconds long; they
start over after recovery) nor the recent-findings list of snapshots.

Layout (integers little-endian; attribute maps inside the JSON are base64 of packed
u64 triples, zlib-compressed, see :func:`_pack`)::

    magic "\\x89HKCKPT\\n" | u16 version | u16 reserved | u32 payload_len | u32 crc32(payload)
    | payload = JSON (maps inside it compressed, see :func:`_pack`)

The CRC covers the whole payload, so a flipped byte or a torn write anywhere after the
header is caught before anything is decoded; :class:`~hekitrace.errors.TraceFormatError`
then names the file and the byte offset, and recovery falls back to an older checkpoint.
Why JSON around packed maps: checkpoints are rare (every few minutes) and must stay
readable across versions (``version`` gates it) and by hand (``tail -c +21 FILE | jq``
shows everything but the maps); the maps, which are nearly all of the bytes, are packed
because as JSON lists they took ~5 s to encode for 100 VMs x 10k ranges (packed: about
2 s, mostly iterating the AttrMaps; bench/bench_journal.py).

The restore writes into a freshly built pipeline; it touches ``Host._live`` and
``Pipeline._by_type`` because neither class has a public way to add state that did not
come from events. tests/unit/test_checkpoint.py fails if Guest grows a field this module
does not carry.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import sys
import zlib
from array import array
from itertools import chain
from typing import Any

from hekitrace.errors import TraceFormatError
from hekitrace.state.attrmap import AttrMap
from hekitrace.state.changes import Change, MapChange, VmKey
from hekitrace.state.events import CLASS_BY_NAME
from hekitrace.state.host import Guest, MemslotInfo

MAGIC = b"\x89HKCKPT\n"
VERSION = 1
_HEAD = struct.Struct("<8sHHII")
#: every Guest slot this module saves (checked against Guest.__slots__ by the tests);
#: ``_slot_gfns`` is derived from memslots and rebuilt.
GUEST_FIELDS = frozenset({"key", "name", "uuid", "vmm", "pid", "created_ns", "destroyed_ns",
                          "requested", "applied", "memslots", "pinned_cr", "lockdown_ns",
                          "counters", "degraded_reasons", "preexisting", "heki_applied_seen",
                          "_slot_gfns", "vm_fd", "stats_path"})


class Checkpoint:
    """A decoded checkpoint: ``segment`` is the first journal segment to replay after it,
    ``time_ns`` when it was taken (Unix-epoch ns), ``state`` the JSON-ready dict."""

    __slots__ = ("segment", "state", "time_ns")

    def __init__(self, segment: int, time_ns: int, state: dict) -> None:
        self.segment = segment
        self.time_ns = time_ns
        self.state = state


# -- capture ------------------------------------------------------------------------------

def _pack(attrs: AttrMap) -> str:
    """A map's ranges as base64 of zlib of little-endian u64 (start, end, value) triples.

    Why not JSON lists: 100 VMs x 2 maps x 10k ranges are 2M triples; as JSON lists they
    cost ~5 s to build and encode with the state lock held, packed ~0.5 s."""
    flat = array("Q", chain.from_iterable(attrs.to_list()))
    if sys.byteorder == "big":
        flat.byteswap()
    return base64.b64encode(zlib.compress(flat.tobytes(), 1)).decode("ascii")


def _unpack(text: str) -> AttrMap:
    """Inverse of :func:`_pack`; AttrMap.from_list validates order and bounds."""
    raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    if len(raw) % 24:
        raise ValueError(f"packed map of {len(raw)} bytes is not whole (start, end, value) "
                         "triples of u64")
    flat = array("Q")
    flat.frombytes(raw)
    if sys.byteorder == "big":
        flat.byteswap()
    return AttrMap.from_list(zip(flat[0::3], flat[1::3], flat[2::3]))


def _guest_to_dict(g: Guest) -> dict:
    return {"key": [g.key.tgid, g.key.created_ns], "name": g.name, "uuid": g.uuid,
            "vmm": g.vmm, "pid": g.pid, "created_ns": g.created_ns,
            "destroyed_ns": g.destroyed_ns,
            "requested": _pack(g.requested), "applied": _pack(g.applied),
            "memslots": [[slot, m.gpa, m.size_bytes, m.hva, m.flags]
                         for slot, m in sorted(g.memslots.items())],
            "pinned_cr": [[cr, mask] for cr, mask in sorted(g.pinned_cr.items())],
            "lockdown_ns": g.lockdown_ns, "counters": dict(g.counters),
            "degraded_reasons": list(g.degraded_reasons), "preexisting": g.preexisting,
            "heki_applied_seen": g.heki_applied_seen,
            "vm_fd": g.vm_fd, "stats_path": g.stats_path}


def capture_state(pipeline: Any) -> dict:
    """The pipeline's state as a JSON-ready dict (no I/O; caller holds the state lock)."""
    host = pipeline.host
    counts = []
    for (vm, rule, severity), n in pipeline.policy.counts.items():
        counts.append([list(vm) if vm is not None else None, rule, severity, n])
    return {"abi_profile": getattr(pipeline.abi, "name", ""),
            "host": {"counters": dict(host.counters),
                     "guests": [_guest_to_dict(g) for g in host.guests.values()]},
            "pipeline": {"events": pipeline.events_by_kind,
                         "lost": [[s, r, n] for (s, r), n in sorted(pipeline.lost.items())],
                         "findings_emitted": pipeline.findings_emitted,
                         "last_event_ns": pipeline.last_event_ns},
            "policy_counts": counts}


def encode(segment: int, time_ns: int, state: dict) -> bytes:
    """The file bytes of a checkpoint that precedes journal segment ``segment``."""
    doc = {"format": VERSION, "segment": segment, "time_ns": time_ns, "state": state}
    payload = json.dumps(doc, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, path: str = "<checkpoint>") -> Checkpoint:
    """Check and decode checkpoint bytes; TraceFormatError names what and where."""
    if len(data) < _HEAD.size:
        raise TraceFormatError(f"truncated checkpoint header ({len(data)} bytes)",
                               path=path, offset=0)
    magic, version, _, size, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise TraceFormatError("not a hekitrace checkpoint (bad magic)", path=path, offset=0)
    if version != VERSION:
        raise TraceFormatError(f"checkpoint version {version}; this hekitrace reads "
                               f"version {VERSION}", path=path, offset=8)
    payload = data[_HEAD.size:]
    if len(payload) != size:
        raise TraceFormatError(f"checkpoint payload is {len(payload)} bytes, header says "
                               f"{size} (truncated?)", path=path, offset=_HEAD.size)
    if zlib.crc32(payload) != crc:
        raise TraceFormatError("checkpoint payload fails its CRC32 (corrupt)", path=path,
                               offset=_HEAD.size)
    try:
        doc = json.loads(payload)
        return Checkpoint(int(doc["segment"]), int(doc["time_ns"]), dict(doc["state"]))
    except (ValueError, KeyError, TypeError, zlib.error) as error:
        raise TraceFormatError(f"checkpoint content unreadable: {error}", path=path,
                               offset=_HEAD.size) from None


# -- restore ------------------------------------------------------------------------------

def _guest_from_dict(d: dict) -> Guest:
    key = VmKey(int(d["key"][0]), int(d["key"][1]))
    g = Guest(key, name=str(d["name"]), uuid=str(d["uuid"]), vmm=str(d["vmm"]),
              preexisting=bool(d["preexisting"]))
    g.pid = int(d["pid"])
    g.created_ns = int(d["created_ns"])
    g.destroyed_ns = None if d["destroyed_ns"] is None else int(d["destroyed_ns"])
    g.requested = _unpack(d["requested"])
    g.applied = _unpack(d["applied"])
    g.memslots = {int(s): MemslotInfo(int(gpa), int(size), int(hva), int(flags))
                  for s, gpa, size, hva, flags in d["memslots"]}
    g._rebuild_slot_gfns()
    g.pinned_cr = {int(cr): int(mask) for cr, mask in d["pinned_cr"]}
    g.lockdown_ns = None if d["lockdown_ns"] is None else int(d["lockdown_ns"])
    g.counters.update({str(k): int(v) for k, v in d["counters"].items()})
    g.degraded_reasons = [str(r) for r in d["degraded_reasons"]]
    g.heki_applied_seen = bool(d["heki_applied_seen"])
    # absent from checkpoints written before Host merged creation reports: unknown
    g.vm_fd = int(d.get("vm_fd", -1))
    g.stats_path = str(d.get("stats_path", ""))
    return g


def restore(pipeline: Any, state: dict, path: str = "<checkpoint>") -> int:
    """Load ``state`` into an empty ``pipeline``; returns the number of guests.

    Observers are told about every restored range as a change from 0 (so page counts
    for metrics and the kernel fault filter start right). A state that does not decode
    raises TraceFormatError and leaves the pipeline untouched.
    """
    try:
        guests = [_guest_from_dict(d) for d in state["host"]["guests"]]
        host_counters = {str(k): int(v) for k, v in state["host"]["counters"].items()}
        p = state["pipeline"]
        events = {CLASS_BY_NAME[k]: int(v) for k, v in p["events"].items()
                  if k in CLASS_BY_NAME}
        lost = {(str(s), str(r)): int(n) for s, r, n in p["lost"]}
        counts = {(VmKey(int(vm[0]), int(vm[1])) if vm is not None else None, str(rule),
                   str(sev)): int(n) for vm, rule, sev, n in state["policy_counts"]}
        findings_emitted = int(p["findings_emitted"])
        last_event_ns = int(p["last_event_ns"])
    except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as error:
        raise TraceFormatError(f"checkpoint state does not decode: "
                               f"{type(error).__name__}: {error}", path=path) from None
    host = pipeline.host
    host.guests.clear()
    host._live.clear()
    for g in guests:
        host.guests[g.key] = g
        live = host._live.get(g.key.tgid)
        if g.destroyed_ns is None and (live is None or live.created_ns < g.created_ns):
            host._live[g.key.tgid] = g
    host.counters.update(host_counters)
    pipeline._by_type.update(events)
    pipeline.lost.clear()
    pipeline.lost.update(lost)
    pipeline.findings_emitted = findings_emitted
    pipeline.last_event_ns = last_event_ns
    pipeline.policy.counts.clear()
    pipeline.policy.counts.update(counts)
    for observer in list(pipeline._observers):
        for g in guests:
            changes = tuple(MapChange(which, s, e, 0, v) for which in ("requested", "applied")
                            for s, e, v in getattr(g, which))
            if changes:
                observer(Change(event=None, vm=g.key, map_changes=changes), [])
    return len(guests)
