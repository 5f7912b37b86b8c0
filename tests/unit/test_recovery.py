"""hekitrace.journal.recovery: checkpoint + journal replay + reconciliation with running VMs.

A "crash" is a journal that is simply abandoned (no close, no final checkpoint) after
its last end-of-batch flush: what a kill -9 leaves on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from hekitrace.config.settings import parse_config
from hekitrace.journal import checkpoint
from hekitrace.journal.recovery import (
    INCOMPLETE_REASON,
    NOT_DISCOVERED_REASON,
    JournalRecovery,
    gap_reason,
    gone_reason,
)
from hekitrace.journal.segments import scan
from hekitrace.pipeline import Pipeline
from hekitrace.sim.scenarios import simulate
from hekitrace.state.events import VmCreated

T_UP = 1_795_000_000_000_000_000 + 3600 * 10**9


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _config(tmp_path, extra=""):
    return parse_config(f"abi:\n  mbec: true\njournal:\n  directory: {tmp_path}\n"
                        f"  checkpoint_interval_seconds: 10\n{extra}", "<test>")


def _events():
    return simulate(["clean-boot", "module-load-unload", "attack-write-text"], vms=3, seed=2)


def _run(config, events, clock, batches=7, checkpoint_every=3):
    """A daemon's life: recovery (empty), then events in batches with timer runs."""
    messages = []
    rec = JournalRecovery(config, messages.append, monotonic=clock, wall_ns=lambda: T_UP,
                          proc_root="/nonexistent-proc")
    p = Pipeline(config, True)
    rec(p, [])
    step = len(events) // batches + 1
    for n, i in enumerate(range(0, len(events), step)):
        p.feed_many(events[i:i + step])
        rec.journal.after_batch()
        if n % checkpoint_every == checkpoint_every - 1:
            clock.t += 11
            p.tick(events[min(i + step, len(events)) - 1].time_ns)
    return p, rec, messages


def _discovered(pipeline, keep):
    return [VmCreated(T_UP, g.pid, g.pid, vm_fd=3, name=g.name, source="discovery",
                      preexisting=True) for g in pipeline.host.live_guests() if g.pid in keep]


def _strip(state):
    """State without what recovery adds on purpose (gap reasons, the destroys)."""
    for g in state["host"]["guests"]:
        g["degraded_reasons"] = [r for r in g["degraded_reasons"]
                                 if not r.startswith(("monitoring gap", "destroyed while"))]
    state["policy_counts"] = [c for c in state["policy_counts"] if c[1] != "map_degraded"]
    return state


def test_recovery_after_a_crash_equals_the_uninterrupted_state_plus_the_gap(tmp_path):
    config = _config(tmp_path)
    events = _events()
    crashed, rec, _ = _run(config, events, Clock())
    assert rec.journal.checkpoints_written >= 3            # checkpoints were taken,
    assert len(scan(str(tmp_path)).checkpoints) == 2        # retention kept two
    live = sorted(g.pid for g in crashed.host.live_guests())
    running = set(live[:-1])                               # one VMM exited meanwhile
    messages = []
    again = Pipeline(config, True)
    rec2 = JournalRecovery(config, messages.append, monotonic=Clock(), wall_ns=lambda: T_UP,
                           proc_root=str(tmp_path / "proc"))
    covered = rec2(again, _discovered(crashed, running))
    assert {k.tgid for k in covered} == running
    report = rec2.report
    assert len(report.gone) == 1 and len(live) >= 2
    assert report.checkpoint is not None and report.rejected == [] and report.problems == 0
    down = report.down_ns
    for guest in again.host.guests.values():
        before = crashed.host.guests[guest.key]
        assert guest.requested == before.requested and guest.applied == before.applied
        if guest.pid in running and guest.destroyed_ns is None:
            assert guest.counters == before.counters
            assert guest.degraded_reasons[-1] == gap_reason(down, T_UP)
        elif before.destroyed_ns is None:
            assert guest.destroyed_ns == T_UP
            assert guest.counters == dict(before.counters,
                                          vm_destroyed=before.counters["vm_destroyed"] + 1)
            assert guest.degraded_reasons[-1] == gone_reason(down, T_UP)
    want = _strip(checkpoint.capture_state(crashed))
    got = _strip(checkpoint.capture_state(again))
    for g in got["host"]["guests"]:
        if g["pid"] not in running and g["destroyed_ns"] == T_UP:
            g["destroyed_ns"] = None
            g["counters"]["vm_destroyed"] -= 1
    got["pipeline"]["events"]["vm_destroyed"] -= 1
    got["pipeline"]["last_event_ns"] = want["pipeline"]["last_event_ns"]
    assert got == want
    assert any("recovered from checkpoint-" in m for m in messages)


def test_recovery_falls_back_past_a_corrupt_newest_checkpoint_and_says_so(tmp_path):
    config = _config(tmp_path)
    events = _events()
    crashed, _, _ = _run(config, events, Clock())
    listing = scan(str(tmp_path))
    newest = listing.checkpoints[-1][1]
    data = bytearray(Path(newest).read_bytes())
    data[len(data) // 2] ^= 0x01                            # one flipped bit
    Path(newest).write_bytes(bytes(data))
    messages = []
    again = Pipeline(config, True)
    rec = JournalRecovery(config, messages.append, monotonic=Clock(), wall_ns=lambda: T_UP,
                           proc_root=str(tmp_path / "proc"))
    rec(again, _discovered(crashed, {g.pid for g in crashed.host.live_guests()}))
    assert rec.report.checkpoint == listing.checkpoints[-2][1]
    assert len(rec.report.rejected) == 1 and os.path.basename(newest) in rec.report.rejected[0]
    assert "byte 20" in rec.report.rejected[0]
    assert any("skipping checkpoint" in m and "falling back" in m for m in messages)
    assert _strip(checkpoint.capture_state(again)) == _strip(checkpoint.capture_state(crashed))


def test_recovery_skips_a_damaged_block_reports_its_offset_and_reads_on(tmp_path):
    config = _config(tmp_path, "  segment_bytes: 200000\n")
    events = _events()
    _run(config, events, Clock(), batches=30, checkpoint_every=1000)
    seg = scan(str(tmp_path)).segments[-1][1]
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff\xff\xff\xff")
    messages = []
    again = Pipeline(config, True)
    r = JournalRecovery(config, messages.append, monotonic=Clock(), wall_ns=lambda: T_UP,
                           proc_root=str(tmp_path / "proc"))
    r(again, [])
    assert r.report.problems >= 1
    assert any(os.path.basename(seg) in m and "byte" in m for m in messages)
    assert 0 < r.report.events < len(events)


def test_recovery_with_no_journal_starts_empty_and_journals_from_now(tmp_path):
    config = _config(tmp_path)
    messages = []
    p = Pipeline(config, True)
    rec = JournalRecovery(config, messages.append, monotonic=Clock(), wall_ns=lambda: T_UP,
                           proc_root=str(tmp_path / "proc"))
    assert rec(p, [VmCreated(T_UP, 5, 5, vm_fd=3, source="discovery", preexisting=True)]) \
        == set()
    assert p.host.guests == {} and rec.journal is not None and rec.journal.healthy
    assert any("starting empty" in m for m in messages)


def test_recovery_keeps_a_vm_discovery_missed_while_its_vmm_process_exists(tmp_path):
    config = _config(tmp_path)
    crashed, _, _ = _run(config, _events(), Clock())
    live = sorted(g.pid for g in crashed.host.live_guests())
    proc = tmp_path / "proc"
    (proc / str(live[0])).mkdir(parents=True)      # its VMM still runs, discovery failed
    again = Pipeline(config, True)
    rec = JournalRecovery(config, lambda m: None, monotonic=Clock(), wall_ns=lambda: T_UP,
                          proc_root=str(proc))
    assert rec(again, []) == set()
    kept = again.host.by_tgid(live[0])
    assert kept is not None and kept.requested == crashed.host.by_tgid(live[0]).requested
    assert kept.degraded_reasons[-1] == NOT_DISCOVERED_REASON
    assert kept.degraded_reasons[-2].startswith("monitoring gap")
    assert sorted(k.tgid for k in rec.report.gone) == live[1:]


def test_recovery_without_checkpoint_and_first_segment_says_the_state_is_incomplete(tmp_path):
    config = _config(tmp_path, "  segment_bytes: 100000\n")
    _run(config, _events(), Clock(), batches=20, checkpoint_every=1000)
    listing = scan(str(tmp_path))
    assert len(listing.segments) >= 2
    for _, path in listing.checkpoints + listing.segments[:1]:
        os.unlink(path)                    # retention took segment 1; checkpoints lost
    messages = []
    again = Pipeline(config, True)
    rec = JournalRecovery(config, messages.append, monotonic=Clock(), wall_ns=lambda: T_UP,
                          proc_root=str(tmp_path / "proc"))
    rec(again, [])
    assert any("recovered state is incomplete" in m for m in messages)
    assert again.host.guests
    assert all(INCOMPLETE_REASON in g.degraded_reasons for g in again.host.guests.values())
