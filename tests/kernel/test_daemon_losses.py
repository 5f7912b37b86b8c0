"""The daemon's retirement of a VM with the real capture: the final read of its kernel
loss counters (Capture.forget_vm) reaches the pipeline, and its hk_loss keys go.

The daemon's loop pieces are driven directly (as in tests/unit/test_daemon.py); the
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
    d = Daemon(config, None, load_config=lambda p: config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               log=io.StringIO(), wall_ns=lambda: T0 + 10**9)
    d.pipeline = Pipeline(config, False)
    d._add_observer()
    d.capture = Capture(settings=loader.CaptureSettings(telemetry_ring_bytes=4096),
                        required={"hypercall": False, "ioctl": False}, attach=False,
                        say=lambda m: None).start()
    pid = os.getpid()
    try:
        d._enqueue([VmCreated(T0, pid, pid, vm_fd=7, name="web1")])
        d._process(100)
        fd = d.capture.program_fd("hk_hypercall_raw")
        for i in range(200):                  # 64 records fit the ring: the rest are lost
            testrun.run_raw_tracepoint(fd, [0x10001, i, 0, 0, 0])
        table = d.capture.bpf[b"hk_loss"]
        dropped = sum(sum(v) for k, v in table.items() if k.tgid == pid)
        assert dropped > 0
        d._enqueue([VmDestroyed(T0 + 5, pid, pid)])   # destroyed before any loss poll
        d._process(100)
        d.pipeline.host.grace_period_ns = 0
        d._timers = {"tick": float("inf"), "control": float("inf"),
                     "status": float("inf"), "expire": 0.0}
        d._run_timers()
        assert d.pipeline.host.guests == {}, "a late loss re-created the VM"
        assert sum(d.stats.lost.get(k, 0) for k in d.stats.lost if k[0] == "ring:telemetry") \
            == dropped
        assert d.pipeline.host.counters["unattributed_lost_events"] == dropped
        assert pid not in [k.tgid for k in table]
    finally:
        d.capture.close()
