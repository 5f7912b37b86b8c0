"""Hostile guests through the Pipeline (host state + rules) and the alert sink.

* A guest that raises findings on purpose (W+X requests over thousands of distinct ranges,
  writes to its protected text) to drown the alert sink: the sink gets at most the rate
  limit plus summaries for it, every occurrence is still counted, memory stays bounded,
  and another VM's finding raised in the middle of the flood comes out of the very
  ``feed`` call of its event (not delayed, not suppressed).
* A guest spinning on a protected page: the kernel collapses the storm into one Fault
  record per interval carrying ``count`` (tests/kernel/test_bpf_capture.py checks that
  half); here each such record is one finding (or one dedup count) whose counts add up.
"""

from __future__ import annotations

import json
import tracemalloc

from hekitrace.config.settings import default_config
from hekitrace.pipeline import Pipeline
from hekitrace.service.alerts import AlertSink
from hekitrace.state.events import (
    AttrApplied,
    Fault,
    FaultAccess,
    Lost,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)

R, W, X, I = 1, 2, 4, 8
T0 = 1_795_000_000_000_000_000
MS = 1_000_000
EVIL, GOOD = 1000, 2000


def vm(pipe: Pipeline, tgid: int, name: str) -> None:
    pipe.feed(VmCreated(T0, tgid, tgid, 3, f"/kvm/{tgid}-3", name, source="ioctl"))
    pipe.feed(Memslot(T0, tgid, tgid, 0, 0, 0, 1 << 32, 0x7f0000000000))


def protect(tgid: int, t: int, gpa: int, end: int, perms: int) -> ProtectRequest:
    return ProtectRequest(t, tgid, tgid, 0x1000, (ProtectEntry(gpa, end, perms),), 1, 0, 1)


def test_finding_flood_is_bounded_and_does_not_delay_another_vm(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    pipe = Pipeline(default_config(), clock=lambda: T0)
    sink = AlertSink(stdout=False, path=str(alerts))
    pipe.add_observer(sink)
    vm(pipe, EVIL, "evil")
    vm(pipe, GOOD, "good")
    limit = pipe.config.policy.rate_limit.findings
    flood = 20_000
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    good_findings = None
    for i in range(flood):
        t = T0 + 1 + i * 10_000       # 100 000 requests per second of event time
        gpa = 0x1000000 + (i % 4096) * 0x2000
        pipe.feed(protect(EVIL, t, gpa, gpa + 0x1000, R | W | X))
        if i == flood // 2:
            good_findings = pipe.feed(protect(GOOD, t, 0x2000000, 0x2001000, R | W | X))
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    pipe.tick(T0 + 10**12)
    sink.close()

    assert [f.rule for f in good_findings] == ["wx_request"], good_findings
    assert good_findings[0].to_dict()["vm"]["name"] == "good"
    lines = alerts.read_text().splitlines()
    evil_lines = [x for x in lines if '"name":"evil"' in x.replace(" ", "")]
    # the admitted findings, one dedup summary for each of them and one rate-limit
    # summary per rule and window: bounded by the policy, not by the guest
    assert len(evil_lines) <= 2 * limit + 10, len(evil_lines)
    counts = {k[1]: n for k, n in pipe.policy.counts.items() if k[0].tgid == EVIL}
    assert counts["wx_request"] == flood, counts          # every occurrence counted
    # and nothing lost on the way to the sink: the counts it printed add up to the flood
    printed = sum(json.loads(x)["count"] for x in evil_lines
                  if json.loads(x)["rule"] == "wx_request")
    assert printed == flood, printed
    # state for 4096 ranges x 2 maps plus bounded dedup/rate tables, not per request
    assert grown < 16 << 20, f"{grown} bytes grown during the flood"


def test_spinning_on_a_protected_page_counts_every_fault():
    pipe = Pipeline(default_config(), clock=lambda: T0)
    vm(pipe, EVIL, "spinner")
    pipe.feed(protect(EVIL, T0 + 1, 0x1000000, 0x1800000, R | X | I))
    kvm = pipe.abi.guest_to_kvm(R | X | I)
    pipe.feed(AttrApplied(T0 + 2, EVIL, EVIL, 0x1000, 0x1800, kvm))   # what KVM enforced
    emitted = 0
    intervals, per_interval = 600, 250_000     # ten minutes of a vCPU spinning
    for k in range(intervals):
        t = T0 + (k + 1) * 1_000 * MS
        findings = pipe.feed(Fault(t, EVIL, EVIL, 0, 0x1000000 + 0x10, 0x6, 0xffffffff81000000,
                                   int(FaultAccess.WRITE), per_interval, t - 999 * MS))
        emitted += sum(f.count for f in findings)
    for f in pipe.tick(T0 + 10**13):
        emitted += f.count
    key = next(k for k in pipe.policy.counts if k[0].tgid == EVIL and k[1] == "protected_write")
    assert pipe.policy.counts[key] == intervals * per_interval
    assert emitted == intervals * per_interval   # the printed counts add up, too


def test_regression_loss_read_after_destroy_does_not_create_a_zombie_vm():
    """The daemon reads the kernel's loss table periodically, so the last losses of a VMM
    that exits can arrive after its VmDestroyed. They belong to that (destroyed) VM; a
    new implicit guest for a dead process would stay in state, /metrics and ``vms``
    forever, since no destroy event will ever come for it."""
    pipe = Pipeline(default_config(), clock=lambda: T0)
    vm(pipe, EVIL, "gone")
    pipe.feed(VmDestroyed(T0 + MS, EVIL, EVIL))
    pipe.feed(Lost(T0 + 2 * MS, EVIL, 0, "ring:telemetry", "ring_full", 33, "hypercall"))
    assert pipe.host.by_tgid(EVIL) is None, "a dead VMM got a new, never-ending VM"
    (guest,) = pipe.host.guests.values()
    assert guest.counters["lost_events"] == 33 and guest.degraded
    pipe.host.expire(T0 + 10**12)
    assert pipe.host.guests == {}
