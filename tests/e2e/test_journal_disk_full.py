"""A journal on a tiny filesystem (tmpfs, size=2m) that fills up (issue 9).

The daemon must keep serving metrics and snapshots while the journal cannot write,
report the failure (hekitrace_journal_healthy 0, write errors by errno name, a log line,
``status``), and write again once space is freed; the checkpoint it then writes holds the
events applied meanwhile, so a kill -9 right after loses none of them.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from hekitrace.service.control_client import ControlClient
from tests.e2e.daemon_proc import metric_value, wait_for
from tests.e2e.journal_helpers import hypercall_prog_fd, journal_daemon, new_vm, send_protect

pytestmark = pytest.mark.e2e


def _fill(path) -> int:
    """Write ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as error:
                assert error.errno == 28, error      # ENOSPC
                break
    return written


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_journal_disk_full_keeps_serving_reports_and_recovers(tiny_fs):
    state = tiny_fs / "journal"
    daemon = journal_daemon(state).start()
    me = os.getpid()
    vm = new_vm()
    ctl = ControlClient(daemon.socket_path)

    def count() -> int:
        return ctl.request("snapshot", vm=str(me))["vm"]["counters"]["protect_request"]

    def metric(series: str):
        return metric_value(daemon.metrics(), series)

    try:
        wait_for(lambda: me in {r["pid"] for r in ctl.request("vms")["vms"]}, "test VM", daemon)
        fd = hypercall_prog_fd(daemon)
        for k in range(20):
            send_protect(vm, fd, k)
        wait_for(lambda: count() == 20, "20 requests", daemon)
        assert metric("hekitrace_journal_healthy") == 1.0

        filler = tiny_fs / "filler"
        _fill(filler)
        for k in range(20, 200):           # enough to need more than the free space left
            send_protect(vm, fd, k)
        wait_for(lambda: count() == 200, "requests applied while the disk is full", daemon)
        wait_for(lambda: metric("hekitrace_journal_healthy") == 0.0, "journal unhealthy",
                 daemon)
        # still serving: metrics, snapshots, status with the reason
        assert metric('hekitrace_journal_write_errors_total{reason="ENOSPC"}') >= 1
        status = ctl.request("status")["journal"]
        assert status["healthy"] is False and "ENOSPC" in status["last_error"]
        snap = ctl.request("snapshot", vm=str(me))
        assert snap["vm"]["counters"]["protect_request"] == 200 and snap["ranges"]
        assert "journal write failed" in daemon.stderr() or \
            "journal checkpoint failed" in daemon.stderr() or \
            "journal fsync failed" in daemon.stderr(), daemon.stderr()

        filler.unlink()                    # space returns
        wait_for(lambda: metric("hekitrace_journal_healthy") == 1.0, "journal healthy again",
                 daemon)
        assert "journal: writing again" in daemon.stderr()
        for k in range(200, 210):
            send_protect(vm, fd, k)
        wait_for(lambda: count() == 210, "requests after recovery", daemon)
        before = ctl.request("snapshot", vm=str(me))
        os.close(fd)
        daemon.proc.kill()
        daemon.proc.wait(10)
        daemon.close()
        daemon = journal_daemon(state).start()
        ctl = ControlClient(daemon.socket_path)
        after = ctl.request("snapshot", vm=str(me))
        assert after["ranges"] == before["ranges"]
        assert after["vm"]["counters"] == before["vm"]["counters"]
        assert "Traceback" not in daemon.stderr()
    finally:
        vm.close()
        daemon.close()
