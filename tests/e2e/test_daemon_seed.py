"""A daemon started on a host with VMs already running re-teaches the kernel the memslots
its recovered state knows (Capture.seed_memslots), so their page lists stay readable.

In-process Daemon with the real capture (compiled, loaded, attached) and the journal's
recovery seam played by the test: it restores a VM with two memslots, as a journal
replay would.
"""

from __future__ import annotations

import io
import os
import tempfile

import pytest

from hekitrace.capture.engine import Capture
from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.service.daemon import Daemon
from hekitrace.state.events import Memslot, VmCreated

pytestmark = pytest.mark.e2e

T0 = 1_795_000_000_000_000_000


def test_daemon_seeds_recovered_memslots_into_the_kernel():
    tmp = tempfile.mkdtemp(prefix="hekitrace-seed-")
    config = parse_config(f'metrics:\n  listen: "127.0.0.1:0"\ncontrol:\n  socket: {tmp}/c.sock\n'
                          "alerts:\n  stdout: false\n", "<test>")
    tgid = os.getpid() + 100000   # a VMM pid that exists nowhere: nothing else writes it
    found = [VmCreated(T0 + 5, tgid, tgid, vm_fd=9, name="old", source="discovery",
                       preexisting=True)]

    class Recovery:
        """The journal's recovery seam (service/parts.py), without a journal."""

        journal = None

        def __call__(self, pipeline, discovered):
            pipeline.feed(VmCreated(T0, tgid, tgid, vm_fd=9, name="old", source="journal"))
            pipeline.feed(Memslot(T0 + 1, tgid, tgid, 0, 0, 0x0, 1 << 30, 0x7f0000000000))
            pipeline.feed(Memslot(T0 + 2, tgid, tgid, 1, 0, 1 << 32, 1 << 30,
                                  0x7f1000000000))
            return {pipeline.host.by_tgid(tgid).key}

    daemon = Daemon(config, None, load_config=lambda p: config,
                    pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
                    capture_factory=lambda cfg, say: Capture(cfg, say=say).start(),
                    discover=lambda: found, recovery=Recovery(), log=io.StringIO())
    try:
        daemon.start()
        table = daemon.capture.bpf[b"hk_memslots"]
        value = table[table.Key(tgid)]
        used = [(e.slot, e.gpa, e.size, e.hva) for e in value.e if e.used]
        assert used == [(0, 0, 1 << 30, 0x7f0000000000), (1, 1 << 32, 1 << 30, 0x7f1000000000)]
        assert not daemon.pipeline.host.by_tgid(tgid).degraded
    finally:
        daemon.close()
