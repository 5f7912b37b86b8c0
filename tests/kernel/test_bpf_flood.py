"""A flood on the telemetry ring never costs a control record, and every telemetry record
is either received or counted lost: an XDP generator (bpf/flood.c, BPF_PROG_TEST_RUN with
``repeat``) writes at kernel speed into a small telemetry ring while the test sends
control records through the real hypercall program."""

from __future__ import annotations

import os

import pytest

from hekitrace.capture import loader, records, testrun
from hekitrace.capture.engine import Capture
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.state.events import CrPinRequest, Hypercall, Lost

pytestmark = pytest.mark.kernel


def test_flood_loses_no_control_record_and_counts_every_telemetry_loss():
    s = loader.CaptureSettings(control_ring_bytes=1 << 20, telemetry_ring_bytes=64 * 1024)
    cap = Capture(settings=s, required={"hypercall": False, "ioctl": False}, attach=False,
                  extra_cflags=("-DHK_WITH_FLOOD",), say=lambda m: None).start()
    try:
        flood = cap.program_fd("hk_flood")
        hc = cap.program_fd("hk_hypercall_raw")
        received = 0
        pins = []
        lost = 0
        rounds, per_round, controls = 10, 3000, 25
        for r in range(rounds):
            testrun.run_xdp(flood, repeat=per_round)        # fills 64 KiB many times over
            for i in range(controls):
                testrun.run_raw_tracepoint(hc, [DEFAULT_PROFILE.lock_cr_update, 4,
                                                r * controls + i, 0, 0])
            testrun.run_xdp(flood, repeat=per_round)
            for e in cap.read() + (cap.poll_losses() if r == rounds - 1 else []):
                if isinstance(e, Hypercall) and e.nr == records.FLOOD_NR:
                    received += 1
                elif isinstance(e, CrPinRequest) and e.tgid == os.getpid():
                    pins.append(e.mask)
                elif isinstance(e, Lost):
                    assert e.stage == "ring:telemetry" and e.hook == "flood", e
                    lost += e.count
        sent = cap.bpf[b"hk_flood_sent"].values()[0].value
        assert sent == rounds * per_round * 2
        assert lost > 0, "the generator must actually overflow the ring"
        assert received > 0
        assert received + lost == sent
        assert pins == list(range(rounds * controls)), "no control record may be lost"
    finally:
        cap.close()
