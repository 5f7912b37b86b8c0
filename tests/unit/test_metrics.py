"""hekitrace.service.metrics: golden /metrics for a fixed scenario, VM series lifecycle, docs.

The state is built by the real ``Host`` from events; the exposition is rendered by
prometheus_client from the real collector. Set HEKITRACE_UPDATE_GOLDEN=1 (the one switch
for every golden file, tests/conftest.py) to rewrite the golden file after an intended
change, and review the diff.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.service.metrics import (
    METRICS,
    SPEC_BY_NAME,
    HekitraceCollector,
    LoopStats,
    PageCounts,
    vm_labels,
)
from hekitrace.state.changes import VmKey
from hekitrace.state.events import (
    AttrApplied,
    CrPinRequest,
    Lost,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)
from hekitrace.state.host import Host

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "metrics" / "scenario.prom"
T0 = 1_795_000_000_000_000_000
BUILD = {"version": "0.0.0-test", "python_version": "3.11.2", "bcc_version": "0.26.0",
         "kernel_release": "6.18.0-test"}


def _scenario():
    abi = DEFAULT_PROFILE
    host = Host(abi, grace_period_ns=300 * 10**9)
    r, _w, x, imm = (abi.kvm_heki_mask & (1 << b) for b in (4, 5, 6, 7))
    events = [
        VmCreated(T0, 100, 100, name="web1", uuid="11111111-2222-3333-4444-555555555555",
                  vmm="qemu", source="uevent"),
        Memslot(T0 + 1, 100, 100, 0, 0, 0, 1 << 30, 0x7f0000000000),
        ProtectRequest(T0 + 2, 100, 100, 0x5000, (
            ProtectEntry(0x1000000, 0x1800000, 0b1101),   # R_X immutable text, 2048 pages
            ProtectEntry(0x1800000, 0x1a00000, 0b1001),   # R__ immutable rodata, 512 pages
        ), declared_entries=2),
        AttrApplied(T0 + 3, 100, 100, 0x1000, 0x1800, r | x | imm),
        AttrApplied(T0 + 4, 100, 100, 0x1800, 0x1a00, r | imm),
        CrPinRequest(T0 + 5, 100, 100, 4, 0x300000, 0),
        CrPinRequest(T0 + 6, 100, 100, 0, 0x10000, 0),
        VmCreated(T0 + 10, 200, 200, name="db", uuid="", vmm="firecracker", source="ioctl"),
        Lost(T0 + 11, 200, 200, "ring:telemetry", "ring_full", 7, "page_fault"),
        VmCreated(T0 + 20, 300, 300, name="old", vmm="qemu", source="uevent"),
        VmDestroyed(T0 + 21, 300, 300),
    ]
    stats = LoopStats(queue_capacity=65536)
    pages = PageCounts()
    for ev in events:
        pages.observe(host.apply(ev))
        stats.events_by_kind[type(ev).__name__ and {
            VmCreated: "vm_created", Memslot: "memslot", ProtectRequest: "protect_request",
            AttrApplied: "attr_applied", CrPinRequest: "cr_pin_request", Lost: "lost",
            VmDestroyed: "vm_destroyed"}[type(ev)]] += 1
        stats.last_event_ns = ev.time_ns
    db = host.by_tgid(200).key
    stats.count_lost("ring:telemetry", "ring_full", 7, db)
    web1 = host.by_tgid(100).key
    stats.count_finding(web1, "wx_request", "critical", 3)
    stats.count_finding(None, "protection_unsupported", "warning")
    stats.hooks = [("hypercall", "raw_tracepoint", True, True),
                   ("attr_applied", "none", False, False),
                   ("ioctl", "tracepoint", True, True)]
    stats.ready = True
    stats.config_sha256 = "ab" * 32
    stats.config_reload_ns = T0
    stats.queue_depth = 5
    _scenario.pages = pages
    return host, abi, stats


def _render(host, abi, stats, label="name", pages=None):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HekitraceCollector(lambda: (host, abi, None), stats, BUILD, label,
                                         page_counts=pages))
    return generate_latest(registry).decode()


def test_metrics_golden_scenario(golden):
    golden(GOLDEN, _render(*_scenario()))


def test_metrics_incremental_page_counts_render_the_same_as_a_recount():
    host, abi, stats = _scenario()
    _scenario.pages.check(host)
    assert _render(host, abi, stats, pages=_scenario.pages) == GOLDEN.read_text()


def test_metrics_page_counts_follow_random_changes():
    import random
    rng = random.Random(7)
    abi = DEFAULT_PROFILE
    host = Host(abi)
    pages = PageCounts()
    pages.observe(host.apply(VmCreated(T0, 9, 9, name="r")))
    values = [0, 0x10, 0x50, 0x30, 0xd0, 0x08]
    for i in range(400):
        start = rng.randrange(0, 200)
        end = start + rng.randrange(1, 40)
        pages.observe(host.apply(AttrApplied(T0 + i, 9, 9, start, end, rng.choice(values))))
        pages.check(host)
    host.apply(VmDestroyed(T0 + 500, 9, 9))
    for change in host.expire(T0 + 500 + 301 * 10**9):
        pages.observe(change)
    assert pages.by_vm == {}


def test_metrics_no_created_series_and_prefix():
    text = _render(*_scenario())
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert all(n.startswith("hekitrace_") for n in names)
    assert not any(n.endswith("_created") for n in names)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool absent: scripts/setup.sh installs Debian's prometheus")
def test_metrics_promtool_accepts_the_exposition():
    proc = subprocess.run(["promtool", "check", "metrics"], check=False, input=_render(*_scenario()),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_destroyed_vm_series_disappear_after_grace():
    host, abi, stats = _scenario()
    assert 'vm="old"' in _render(host, abi, stats)
    for change in host.expire(T0 + 21 + 301 * 10**9):
        stats.forget_vm(change.vm)
    text = _render(host, abi, stats)
    assert 'vm="old"' not in text
    assert 'vm="web1"' in text and "hekitrace_vms 2.0" in text


def test_metrics_retired_vm_findings_and_losses_go_with_it():
    host, abi, stats = _scenario()
    db = host.by_tgid(200).key
    host.apply(VmDestroyed(T0 + 30, 200, 200))
    for change in host.expire(T0 + 30 + 301 * 10**9):
        stats.forget_vm(change.vm)
    text = _render(host, abi, stats)
    assert 'vm="db"' not in text
    assert (db, "ring:telemetry") not in stats.vm_lost
    # the global loss counter keeps counting what happened
    assert 'hekitrace_events_lost_total{reason="ring_full",stage="ring:telemetry"} 7.0' in text


def test_metrics_vm_label_modes_and_collisions():
    class G:
        def __init__(self, tgid, created, name, uuid="", destroyed=None):
            self.key, self.pid, self.created_ns = VmKey(tgid, created), tgid, created
            self.name, self.uuid, self.destroyed_ns = name, uuid, destroyed
    a, b, c, d = G(1, 10, "web"), G(2, 20, "web"), G(3, 30, ""), G(3, 40, "")
    assert vm_labels([a, c]) == {a.key: "web", c.key: "pid-3"}
    assert vm_labels([a, b]) == {a.key: "web@1", b.key: "web@2"}
    labels = vm_labels([c, d])
    assert labels[c.key] != labels[d.key] and len(set(labels.values())) == 2
    # the live VM keeps its name; the retired one in its grace period is suffixed
    old, new = G(7, 1, "db", destroyed=5), G(7, 9, "db")
    assert vm_labels([old, new]) == {old.key: "db@7", new.key: "db"}
    old2 = G(7, 2, "db", destroyed=6)
    labels = vm_labels([old, old2, new])
    assert labels[new.key] == "db" and len(set(labels.values())) == 3
    assert vm_labels([a], "pid") == {a.key: "1"}
    assert vm_labels([G(5, 1, "x", "u-1")], "uuid") == {VmKey(5, 1): "u-1"}


def test_metrics_every_emitted_family_is_declared():
    text = _render(*_scenario())
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            full = name + "_total" if kind == "counter" and not name.endswith("_total") else name
            assert full in SPEC_BY_NAME, f"{full} emitted but not in METRICS (undocumented)"
            assert SPEC_BY_NAME[full].type == kind


def test_metrics_names_match_the_contract():
    """Every metric in docs/internals.md "Metrics" is declared, and nothing else."""
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    import re
    contract = set(re.findall(r"(hekitrace_[a-z_]+)", section))
    assert contract == {spec.name for spec in METRICS}


def test_metrics_doc_is_generated_and_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_metrics_doc.py"),
                           "--check"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for spec in METRICS:
        assert f"`{spec.name}`" in doc


def test_config_info_says_defaults_when_no_file_is_in_force(tmp_path):
    """The HELP text promises "defaults" without a file; a file (even an empty one,
    whose digest equals the defaults') shows its digest."""
    from hekitrace.config.settings import default_config, load_config

    assert default_config().digest_label == "defaults"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    loaded = load_config(str(empty))
    assert loaded.digest_label == loaded.sha256 != "defaults"
