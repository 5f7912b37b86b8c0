"""The daemon's retirement of a VM with the real capture: the final read of its kernel
loss counters (Capture.forget_vm) reaches the pipeline, and its hk_loss keys go.

The daemon's public steps are driven directly (as in tests/unit/test_daemon.py); the
drops are real: this process is the "VMM", its hypercalls run the daemon's program
through BPF_PROG_TEST_RUN into a one-page telemetry ring that overflows.
"""

from __future__ import annotations

import io
import os

import pytest

from hekitrace.capture import loader, testrun
from hekitrace.capture.engine import Capture
from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.service.daemon import Daemon
from hekitrace.state.events import VmCreated, VmDestroyed

pytestmark = pytest.mark.kernel

T0 = 1_795_000_000_000_000_000


def test_retiring_a_vm_feeds_its_final_losses_and_empties_its_loss_keys():
    config = parse_config("capture:\n  queue_events: 100\nalerts:\n  stdout: false\n", "<t>")
    cap = Capture(settings=loader.CaptureSettings(telemetry_ring_bytes=4096),
                  required={"hypercall": False, "ioctl": False}, attach=False,
                  say=lambda m: None).start()
    d = Daemon(config, None, load_config=lambda p: config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               capture_factory=lambda cfg, say: cap,
               log=io.StringIO(), wall_ns=lambda: T0 + 10**9)
    pid = os.getpid()
    try:
        d.start_capture()                     # nothing attached: the applied hook is off
        d.build_pipeline()
        d.ingest.enqueue([VmCreated(T0, pid, pid, vm_fd=7, name="web1")])
        d.ingest.process(100)
        fd = cap.program_fd("hk_hypercall_raw")
        for i in range(200):                  # 64 records fit the ring: the rest are lost
            testrun.run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
        table = cap.bpf[b"hk_loss"]
        dropped = sum(sum(v) for k, v in table.items() if k.tgid == pid)
        assert dropped > 0
        d.ingest.enqueue([VmDestroyed(T0 + 5, pid, pid)])   # destroyed before any loss poll
        d.ingest.process(100)
        d.pipeline.host.grace_period_ns = 0
        d.expire()                            # the expiry timer's step
        assert d.pipeline.host.guests == {}, "a late loss re-created the VM"
        assert sum(d.stats.lost.get(k, 0) for k in d.stats.lost if k[0] == "ring:telemetry") \
            == dropped
        assert d.pipeline.host.counters["unattributed_lost_events"] == dropped
        assert pid not in [k.tgid for k in table]
    finally:
        cap.close()
