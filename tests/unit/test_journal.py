"""hekitrace.journal.segments: segments, flush per batch, checkpoints, rotation and retention.

Everything runs on real files in a temporary directory; the disk-full behaviour is
tested against a real full filesystem in tests/e2e/test_journal_disk_full.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hekitrace.config.settings import parse_config
from hekitrace.journal import checkpoint
from hekitrace.journal.segments import Journal, checkpoint_name, expand_paths, scan, segment_name
from hekitrace.pipeline import Pipeline
from hekitrace.sim.scenarios import simulate
from hekitrace.trace.file import read_events


def _config(tmp_path, **journal):
    lines = "".join(f"  {k}: {v}\n" for k, v in journal.items())
    return parse_config(f"abi:\n  mbec: true\njournal:\n  directory: {tmp_path}\n{lines}",
                        "<test>")


def _events():
    return simulate(["clean-boot", "module-load-unload", "attack-write-text"], vms=4, seed=1)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _journal(config, pipeline, clock, messages):
    def make(segment, time_ns):
        return checkpoint.encode(segment, time_ns, checkpoint.capture_state(pipeline))
    j = Journal(config.journal, make, say=messages.append, monotonic=clock,
                wall_ns=lambda: 1_795_000_000_000_000_000)
    j.start(pipeline)
    return j


def test_journal_start_writes_a_checkpoint_and_opens_the_next_segment(tmp_path):
    config = _config(tmp_path)
    p = Pipeline(config, True)
    messages = []
    j = _journal(config, p, Clock(), messages)
    listing = scan(str(tmp_path))
    assert [s for s, _ in listing.checkpoints] == [1] and [s for s, _ in listing.segments] == [1]
    assert j.healthy and j.health() == (True, {}, j.bytes) and j.bytes > 0
    # a second journal on the same directory (a restart) never appends to segment 1,
    # and removes a checkpoint temp file a kill -9 left behind
    (tmp_path / "checkpoint-000002.hkck.tmp").write_bytes(b"half")
    j2 = _journal(config, Pipeline(config, True), Clock(), messages)
    assert j2.segment == 2 and messages == []
    assert not (tmp_path / "checkpoint-000002.hkck.tmp").exists()


def test_journal_events_reach_the_file_at_the_end_of_each_batch(tmp_path):
    config = _config(tmp_path)
    p = Pipeline(config, True)
    j = _journal(config, p, Clock(), [])
    events = _events()
    p.feed_many(events[:100])
    path = os.path.join(tmp_path, segment_name(j.segment))
    assert list(read_events(path)) == []          # applied, still in the block buffer
    j.after_batch()                               # the daemon's end of batch
    assert list(read_events(path)) == events[:100]   # readable by another process now
    p.feed_many(events[100:])
    j.after_batch()
    assert list(read_events(path)) == events and j.events_written == len(events)


def test_journal_checkpoint_interval_starts_a_new_segment_with_the_state(tmp_path):
    config = _config(tmp_path, checkpoint_interval_seconds=10, fsync_interval_seconds=1)
    p = Pipeline(config, True)
    clock = Clock()
    j = _journal(config, p, clock, [])
    events = _events()
    p.feed_many(events[:500])
    j.after_batch()
    clock.t += 11
    p.tick(events[499].time_ns)                  # timer run: observers get NO_CHANGE
    assert j.segment == 2
    ckpt = checkpoint.decode((tmp_path / checkpoint_name(2)).read_bytes())
    assert ckpt.segment == 2
    assert ckpt.state == checkpoint.capture_state(p)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    p.feed_many(events[500:])
    j.after_batch()
    assert list(read_events(os.path.join(tmp_path, segment_name(2)))) == events[500:]


def test_journal_rotates_segments_at_segment_bytes(tmp_path):
    config = _config(tmp_path, segment_bytes=20000, max_bytes=10**9)
    p = Pipeline(config, True)
    j = _journal(config, p, Clock(), [])
    events = _events()
    for i in range(0, len(events), 50):
        p.feed_many(events[i:i + 50])
        j.after_batch()
    listing = scan(str(tmp_path))
    assert len(listing.segments) > 3 and len(listing.checkpoints) == 1
    got = [ev for _, path in listing.segments for ev in read_events(path)]
    assert got == events
    assert all(os.path.getsize(path) < 20000 + 50 * 4096 for _, path in listing.segments)


def _fill(tmp_path, segments, checkpoints, age_seconds=0):
    for seq in segments:
        path = os.path.join(tmp_path, segment_name(seq))
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        if age_seconds:
            old = time.time() - age_seconds
            os.utime(path, (old, old))
    for seq in checkpoints:
        with open(os.path.join(tmp_path, checkpoint_name(seq)), "wb") as f:
            f.write(b"c" * 100)


def test_journal_retention_by_age_keeps_what_recovery_needs(tmp_path):
    config = _config(tmp_path, retention_seconds=3600)
    _fill(tmp_path, range(1, 9), [3, 5, 7], age_seconds=7200)
    j = Journal(config.journal, lambda s, t: b"", say=print)
    j.segment = 8
    removed = j.retain()
    listing = scan(str(tmp_path))
    # newest two checkpoints (5, 7) kept; segments from 5 on are needed for the fallback
    assert [s for s, _ in listing.checkpoints] == [5, 7]
    assert [s for s, _ in listing.segments] == [5, 6, 7, 8]
    assert len(removed) == 5


def test_journal_retention_by_size_deletes_oldest_first_and_stops_at_the_need(tmp_path):
    config = _config(tmp_path, max_bytes=67108864 * 2, segment_bytes=67108864)
    _fill(tmp_path, range(1, 9), [2, 6, 7])
    j = Journal(config.journal, lambda s, t: b"", say=print)
    j.segment = 8
    assert j.retain() == [os.path.join(tmp_path, checkpoint_name(2))]  # young and small
    # now over the size limit: old segments go, oldest first, but never 6 and later
    # 8 x 1000 + 2 x 100 bytes: 5500 allowed -> segments 1..3 go, 4 is under the limit
    config = parse_config(f"journal:\n  directory: {tmp_path}\n  max_bytes: 5500\n"
                          "  segment_bytes: 1000\n", "<test>")
    j = Journal(config.journal, lambda s, t: b"", say=print)
    j.segment = 8
    j.retain()
    assert [s for s, _ in scan(str(tmp_path)).segments] == [4, 5, 6, 7, 8]
    config = parse_config(f"journal:\n  directory: {tmp_path}\n  max_bytes: 1000\n"
                          "  segment_bytes: 1000\n", "<test>")
    j = Journal(config.journal, lambda s, t: b"", say=print)
    j.segment = 8
    j.retain()
    assert [s for s, _ in scan(str(tmp_path)).segments] == [6, 7, 8]


def test_journal_close_leaves_a_checkpoint_of_the_final_state(tmp_path):
    config = _config(tmp_path)
    p = Pipeline(config, True)
    j = _journal(config, p, Clock(), [])
    p.feed_many(_events())
    j.after_batch()
    j.close()
    listing = scan(str(tmp_path))
    newest = checkpoint.decode(Path(listing.checkpoints[-1][1]).read_bytes())
    assert newest.state == checkpoint.capture_state(p)
    assert newest.segment == listing.segments[-1][0]


def test_journal_that_cannot_write_reports_counts_and_resumes_with_a_checkpoint(tmp_path):
    blocked = tmp_path / "journal"
    blocked.write_text("a file where the directory should be")
    config = _config(blocked)
    p = Pipeline(config, True)
    clock = Clock()
    messages = []
    j = _journal(config, p, clock, messages)
    assert not j.healthy and j.write_errors and j.health()[0] is False
    assert "ERROR: journal checkpoint failed" in messages[0]
    events = _events()
    p.feed_many(events[:300])
    j.after_batch()
    assert j.events_not_journaled == 300
    blocked.unlink()                       # the operator fixes it
    clock.t += 0.5
    p.tick(events[299].time_ns)            # too early: retried once a second
    assert not j.healthy
    clock.t += 1
    p.tick(events[299].time_ns)
    assert j.healthy and any("writing again" in m for m in messages)
    listing = scan(str(blocked))
    ckpt = checkpoint.decode(Path(listing.checkpoints[-1][1]).read_bytes())
    assert ckpt.state == checkpoint.capture_state(p)   # holds the unjournaled events
    p.feed_many(events[300:])
    j.after_batch()
    assert list(read_events(listing.segments[-1][1])) == events[300:]


def test_journal_expand_paths_turns_a_directory_into_its_segments_in_order(tmp_path):
    _fill(tmp_path, [12, 3, 100], [3])
    other = tmp_path / "x.htrace"
    other.write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expand_paths([str(tmp_path), str(other), str(empty)]) == [
        os.path.join(tmp_path, segment_name(n)) for n in (3, 12, 100)] + [str(other), str(empty)]
