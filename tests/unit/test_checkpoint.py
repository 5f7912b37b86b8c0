"""hekitrace.journal.checkpoint: a pipeline's whole state survives encode -> decode -> restore.

Streams come from the Heki simulator (every attack scenario, several VMs), so maps,
memslots, CR pins, rejections, anomalies and findings counts are all non-trivial.
"""

from __future__ import annotations

import pytest

from hekitrace.config.settings import parse_config
from hekitrace.errors import TraceFormatError
from hekitrace.journal import checkpoint
from hekitrace.pipeline import Pipeline
from hekitrace.service.metrics import PageCounts
from hekitrace.sim.scenarios import simulate
from hekitrace.state.attrmap import AttrMap
from hekitrace.state.events import VmDestroyed
from hekitrace.state.host import Guest

CONFIG = parse_config("abi:\n  mbec: true\n", "<test>")


def _events():
    events = simulate(["clean-boot", "all-attacks", "module-load-unload"], vms=2, seed=3)
    last = events[-1]
    # a destroyed VM too (kept for its grace period, must round-trip as destroyed)
    return events + [VmDestroyed(last.time_ns + 1, events[0].tgid, events[0].tgid, "")]


def _pipeline() -> Pipeline:
    return Pipeline(CONFIG, True, clock=lambda: 0)


def test_checkpoint_roundtrip_then_more_events_equals_an_uninterrupted_pipeline():
    events = _events()
    half = len(events) // 2
    straight, first = _pipeline(), _pipeline()
    straight.feed_many(events)
    first.feed_many(events[:half])
    data = checkpoint.encode(7, 123, checkpoint.capture_state(first))
    ckpt = checkpoint.decode(data, "ck")
    assert (ckpt.segment, ckpt.time_ns) == (7, 123)
    second = _pipeline()
    checkpoint.restore(second, ckpt.state)
    assert checkpoint.capture_state(second) == checkpoint.capture_state(first)
    second.feed_many(events[half:])
    assert checkpoint.capture_state(second) == checkpoint.capture_state(straight)
    for key, guest in straight.host.guests.items():
        other = second.host.guests[key]
        assert other.requested == guest.requested and other.applied == guest.applied
        assert other.memslot_gfn_ranges() == guest.memslot_gfn_ranges()
        other.requested.check()
    assert {g.key for g in second.host.live_guests()} == \
        {g.key for g in straight.host.live_guests()}
    assert any(g.destroyed_ns is not None for g in second.host.guests.values())
    assert straight.policy.counts and second.policy.counts == straight.policy.counts
    assert second.events_by_kind == straight.events_by_kind


def test_checkpoint_carries_every_guest_field():
    # a new Guest field must be added to checkpoint.py (and this set), or it is lost
    assert set(Guest.__slots__) == checkpoint.GUEST_FIELDS


def test_checkpoint_restore_tells_observers_so_page_counts_are_right():
    source = _pipeline()
    source.feed_many(_events())
    target = _pipeline()
    pages = PageCounts()
    target.add_observer(pages.observe)
    checkpoint.restore(target, checkpoint.capture_state(source))
    pages.check(target.host)
    assert pages.by_vm


@pytest.mark.parametrize("where", [0, 9, 14, 20, 21, -1])
def test_checkpoint_flipped_byte_is_detected_with_its_offset(where):
    source = _pipeline()
    source.feed_many(_events())
    data = bytearray(checkpoint.encode(3, 1, checkpoint.capture_state(source)))
    data[where] ^= 0x40
    with pytest.raises(TraceFormatError) as info:
        checkpoint.decode(bytes(data), "ck-x")
    assert info.value.path == "ck-x" and info.value.offset is not None


@pytest.mark.parametrize("keep", [0, 5, 20, 100])
def test_checkpoint_truncated_is_detected(keep):
    data = checkpoint.encode(3, 1, checkpoint.capture_state(_pipeline()))
    with pytest.raises(TraceFormatError, match="truncated"):
        checkpoint.decode(data[:keep] if keep < 20 else data[:-1], "ck")


def test_checkpoint_state_that_does_not_decode_leaves_the_pipeline_untouched():
    source = _pipeline()
    source.feed_many(_events())
    state = checkpoint.capture_state(source)
    # end before start, packed like a real map
    state["host"]["guests"][-1]["requested"] = checkpoint._pack(AttrMap()) + __import__("base64").b64encode(__import__("zlib").compress(bytes.fromhex("050000000000000001000000000000000300000000000000"))).decode()
    target = _pipeline()
    with pytest.raises(TraceFormatError, match="does not decode"):
        checkpoint.restore(target, state, "ck")
    assert target.host.guests == {} and sum(target.events_by_kind.values()) == 0


def test_checkpoint_packed_map_that_is_not_whole_triples_or_not_base64_is_refused():
    source = _pipeline()
    source.feed_many(_events())
    for bad in ("eJxjBQAABgAG", "not base64!", "BQAAAAAAAAAB"):
        state = checkpoint.capture_state(source)
        state["host"]["guests"][0]["applied"] = bad
        with pytest.raises(TraceFormatError, match="does not decode"):
            checkpoint.restore(_pipeline(), state, "ck")
