"""The daemon process under a test-owned NOTIFY_SOCKET: start-up, probes, reload, stop."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.e2e.daemon_proc import DaemonProcess, bpf_prog_ids_of, bpf_progs, metric_value

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess()
    d.start()
    yield d
    d.close()


def test_daemon_sd_notify_status_then_ready_then_watchdog(daemon):
    msgs = list(daemon.messages)
    ready = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    statuses = [m for m in msgs[:ready] if m.startswith("STATUS=")]
    assert statuses[0] == "STATUS=starting: metrics and control socket"
    assert "STATUS=compiling and attaching BPF programs" in statuses
    assert "STATUS=discovering running VMs" in statuses
    assert not any(m.startswith("WATCHDOG=1") for m in msgs[:ready])
    # WATCHDOG_USEC=2 s -> a ping at least every second while the loop runs
    daemon.wait_message(lambda m: m == "WATCHDOG=1", timeout=5)
    daemon.wait_message(lambda m: m.startswith("STATUS=ready"), timeout=5)


def test_daemon_probes_and_metrics(daemon):
    assert daemon.http("/healthz")[0] == 200
    status, body = daemon.http("/readyz")
    assert (status, body) == (200, "ready\n")
    assert daemon.http("/nope")[0] == 404
    text = daemon.metrics()
    assert metric_value(text, "hekitrace_ready") == 1.0
    assert metric_value(text, 'hekitrace_hook_attached{hook="hypercall",method="raw_tracepoint",'
                              'required="true"}') == 1.0
    assert metric_value(text, "hekitrace_config_reload_success") == 1.0


def test_daemon_promtool_accepts_metrics(daemon):
    proc = subprocess.run(["promtool", "check", "metrics"], check=False, input=daemon.metrics(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_daemon_foreground_prints_summary_and_periodic_status(daemon):
    time.sleep(1.5)
    err = daemon.stderr()
    assert "hook hypercall" in err and "attached (raw_tracepoint)" in err
    assert "VMs running at start-up:" in err
    assert "started: ready;" in err
    assert err.count("hekitrace: ready; ") >= 1   # the periodic one-line status


def test_daemon_sighup_with_broken_config_keeps_old_config(daemon):
    before = daemon.metrics()
    sha = [line for line in before.splitlines() if line.startswith("hekitrace_config_info")]
    daemon.config_path.write_text(daemon.base_config + "bogus_section: {}\n")
    daemon.collect()
    mark = len(daemon.messages)
    daemon.signal(signal.SIGHUP)
    daemon.wait_message(lambda m: m.startswith("RELOADING=1"), timeout=10, since=mark)
    failed = daemon.wait_message(lambda m: "config reload FAILED" in m, timeout=10, since=mark)
    assert "bogus_section" in failed
    text = daemon.metrics()
    assert metric_value(text, "hekitrace_config_reload_success") == 0.0
    assert [line for line in text.splitlines()
            if line.startswith("hekitrace_config_info")] == sha
    assert "config reload rejected, keeping the previous configuration" in daemon.stderr()
    assert daemon.proc.poll() is None
    assert daemon.http("/healthz")[0] == 200
    # a good file again: accepted, new digest
    daemon.config_path.write_text(daemon.base_config + "# changed\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while metric_value(daemon.metrics(), "hekitrace_config_reload_success") != 1.0:
        assert time.monotonic() < deadline, daemon.stderr()
        time.sleep(0.1)
    assert [line for line in daemon.metrics().splitlines()
            if line.startswith("hekitrace_config_info")] != sha


def test_daemon_sigterm_detaches_every_program(daemon):
    # Other processes (tests of other tiers) may load programs meanwhile: follow the
    # daemon's own programs by id rather than comparing whole-host lists.
    ours = bpf_prog_ids_of(daemon.proc.pid)
    loaded = bpf_progs()
    assert ours and ours <= set(loaded)
    assert any(loaded[i] == "hk_hypercall_raw" for i in ours)
    rc = daemon.stop()
    assert rc == 0, daemon.stderr()
    assert "STOPPING=1" in daemon.messages
    assert not ours & set(bpf_progs()), "programs of the stopped daemon are still loaded"
    assert "SIGTERM received, stopping" in daemon.stderr()
    assert "stopped:" in daemon.stderr()


def test_daemon_missing_required_hook_is_not_ready_but_runs():
    # kvm_arch_post_set_memory_attributes does not exist on this kernel
    # (docs/kernel-support.md section 1): requiring its hook must give "not ready" with the
    # reason, not a crash loop.
    d = DaemonProcess(extra_config="hooks:\n  attr_applied: required\n")
    try:
        d.start()
        ready = next(m for m in d.messages if m.startswith("READY=1"))
        assert "NOT READY" in ready and "attr_applied" in ready
        status, body = d.http("/readyz")
        assert status == 503 and "required hook attr_applied not attached" in body
        assert d.http("/healthz")[0] == 200
        text = d.metrics()
        assert metric_value(text, "hekitrace_ready") == 0.0
        assert metric_value(text, 'hekitrace_hook_attached{hook="attr_applied",method="none",'
                                  'required="true"}') == 0.0
    finally:
        d.close()
    assert d.proc.returncode == 0
