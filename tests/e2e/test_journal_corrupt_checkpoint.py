"""A flipped byte in the newest checkpoint: recovery says so, falls back to the previous
checkpoint plus the journal, and loses nothing (issue 9)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hekitrace.journal.segments import scan
from hekitrace.service.control_client import ControlClient
from tests.e2e.daemon_proc import wait_for
from tests.e2e.journal_helpers import hypercall_prog_fd, journal_daemon, new_vm, send_protect

pytestmark = pytest.mark.e2e


def test_flipped_byte_in_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    state = tmp_path / "journal"
    daemon = journal_daemon(state).start()
    me = os.getpid()
    vm = new_vm()
    try:
        ctl = ControlClient(daemon.socket_path)
        wait_for(lambda: me in {r["pid"] for r in ctl.request("vms")["vms"]}, "test VM", daemon)
        fd = hypercall_prog_fd(daemon)
        for k in range(40):
            send_protect(vm, fd, k)
            if k == 20:
                time.sleep(1.5)            # a checkpoint between the two halves
        os.close(fd)
        wait_for(lambda: ctl.request("snapshot", vm=str(me))["vm"]["counters"]
                 ["protect_request"] == 40, "40 requests", daemon)
        before = ctl.request("snapshot", vm=str(me))
        assert daemon.stop() == 0          # clean stop: a final checkpoint
        checkpoints = scan(str(state)).checkpoints
        assert len(checkpoints) >= 2
        newest, previous = checkpoints[-1][1], checkpoints[-2][1]
        data = bytearray(Path(newest).read_bytes())
        data[len(data) // 2] ^= 0x10
        Path(newest).write_bytes(bytes(data))
        daemon.close()

        daemon = journal_daemon(state).start()
        ctl = ControlClient(daemon.socket_path)
        after = ctl.request("snapshot", vm=str(me))
        assert after["ranges"] == before["ranges"]
        assert after["vm"]["counters"] == before["vm"]["counters"]
        log = daemon.stderr()
        assert f"skipping checkpoint: {newest} at byte 20: checkpoint payload fails its " \
               "CRC32 (corrupt); falling back to the previous checkpoint" in log, log
        assert f"recovered from {os.path.basename(previous)}" in log, log
    finally:
        vm.close()
        daemon.close()
