"""Rules: for each rule a scenario that fires it and a near-miss that must not; storms."""

from __future__ import annotations

import json

from hekitrace.config.abi import HEKI_V2, AbiProfile
from hekitrace.config.settings import parse_config
from hekitrace.policy.engine import Policy
from hekitrace.state.events import (
    AttrApplied,
    CrPinRequest,
    CrWrite,
    Fault,
    FaultAccess,
    Lost,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
)
from hekitrace.state.host import Host

R, W, X, I = 1, 2, 4, 8
KR, KW, KX, KI, KP = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 3
T0 = 1_795_000_000_000_000_000
S = 1_000_000_000
MBEC = AbiProfile(name="heki-v2-mbec", lock_cr_update=13, protect_memory=14, mbec=True)
TEXT, RODATA, DATA, MODULE = (0x1000, 0x1400), (0x1400, 0x1600), (0x1600, 0x1800), \
    (0x8000, 0x8010)
A, B = 100, 200  # VMM pids of two VMs


def entry(gfns, perms):
    return ProtectEntry(gfns[0] << 12, gfns[1] << 12, perms)


class Rig:
    """A Host and a Policy fed together, with the applied hook mirrored by default."""

    def __init__(self, yaml_text: str = "", abi: AbiProfile = MBEC, hook: bool = True,
                 mirror: bool = True) -> None:
        self.config = parse_config(yaml_text or "{}\n")
        self.abi = abi
        self.host = Host(abi)
        self.policy = Policy(self.config.policy, abi, clock=lambda: T0,
                             applied_hook_active=hook)
        self.mirror = mirror and hook

    def feed(self, event) -> list:
        change = self.host.apply(event)
        return self.policy.evaluate(change, self.host)

    def protect(self, t, *entries, tgid=A, apply=None):
        """A request (entries in host order); mirror what a Heki host applies."""
        ev = ProtectRequest(T0 + t, tgid, tgid, 0x9000, tuple(reversed(entries)))
        out = self.feed(ev)
        if apply if apply is not None else self.mirror:
            guest = self.host.by_tgid(tgid)
            for e in entries:  # replay the effective requested values into applied
                s, en = e.gpa >> 12, e.end_gpa >> 12
                if s < en:
                    for seg_s, seg_e, v in list(guest.requested.segments(s, en)):
                        if guest.applied.values_in(seg_s, seg_e) != {v}:
                            out += self.feed(AttrApplied(T0 + t, tgid, tgid, seg_s, seg_e, v))
        return out

    def boot(self, tgid=A, name="web1", uuid="u-1"):
        out = self.feed(VmCreated(T0, tgid, tgid, name=name, uuid=uuid))
        out += self.feed(Memslot(T0, tgid, tgid, 0, 0, 0, 1 << 30, 0x7f0000000000))
        out += self.feed(CrPinRequest(T0 + 1, tgid, tgid, 0, 1 << 16, 0))
        out += self.feed(CrPinRequest(T0 + 1, tgid, tgid, 4, (1 << 20) | (1 << 21), 0))
        out += self.protect(2, entry(TEXT, R | X | I), entry(RODATA, R | I),
                            entry(DATA, R | W), tgid=tgid)
        return out

    def tick(self, t):
        return self.policy.tick(T0 + t)


def rules(findings):
    return [f.rule for f in findings]


def test_clean_boot_and_module_lifecycle_raise_nothing():
    rig = Rig()
    out = rig.boot()
    out += rig.protect(10, entry(MODULE, R | W))          # module load: RW ...
    out += rig.protect(11, entry(MODULE, R | X))          # ... then sealed R_X
    out += rig.protect(20, entry(MODULE, R | W))          # unload: back to RW
    out += rig.tick(100 * S)
    assert out == []


def test_wx_request_fires_on_write_and_exec():
    rig = Rig()
    rig.boot()
    out = rig.protect(10, entry(MODULE, R | W | X))
    assert rules(out) == ["wx_request"]
    f = out[0].to_dict()
    assert f["severity"] == "critical" and f["vm"]["name"] == "web1"
    assert f["evidence"]["gfn_start"] == MODULE[0] and f["evidence"]["new"] == "rwx"
    json.dumps(f)


def test_wx_near_miss_without_mbec_exec_readded_is_not_wx():
    rig = Rig(abi=HEKI_V2)
    rig.boot()
    assert rig.protect(10, entry(MODULE, R | W)) == []      # stored rwx, asked rw-
    assert rig.host.by_tgid(A).requested.get(MODULE[0]) == KR | KW | KX


def test_immutable_change_on_tightening_request():
    rig = Rig()
    rig.boot()
    out = rig.protect(10, entry(TEXT, R))                     # drop X from r-x I
    assert rules(out) == ["immutable_change"]
    assert out[0].evidence["old"] == ["r-x I"] and out[0].evidence["errno"] == "EPERM"


def test_immutable_change_near_miss_adjacent_range():
    rig = Rig()
    rig.boot()
    assert rig.protect(10, entry((DATA[1], DATA[1] + 4), R)) == []


def test_relax_after_lockdown_on_making_text_writable():
    rig = Rig()
    rig.boot()
    out = rig.protect(10, entry((TEXT[0] + 3, TEXT[0] + 4), R | W | X))
    assert sorted(rules(out)) == ["relax_after_lockdown", "wx_request"]
    out = rig.protect(11, entry(RODATA, R | X))               # rodata executable
    assert rules(out) == ["relax_after_lockdown"]


def test_relax_after_lockdown_near_miss_mutable_module_pages():
    rig = Rig()
    rig.boot()
    rig.protect(10, entry(MODULE, R | X))
    assert rig.protect(11, entry(MODULE, R | W)) == []


def test_immutable_relaxed_when_applied_map_loses_protection():
    rig = Rig()
    rig.boot()
    out = rig.feed(AttrApplied(T0 + 10, A, A, TEXT[0], TEXT[0] + 1, KR | KW | KX))
    assert "immutable_relaxed" in rules(out)
    out = rig.feed(AttrApplied(T0 + 11, A, A, RODATA[0], RODATA[0] + 1, KR | KI | KP))
    assert "immutable_change" in rules(out)


def test_immutable_relaxed_near_miss_same_value_or_mutable_page():
    rig = Rig()
    rig.boot()
    assert rig.feed(AttrApplied(T0 + 10, A, A, *TEXT, KR | KX | KI)) == []
    assert rules(rig.feed(AttrApplied(T0 + 11, A, A, *DATA, KR | KW | KX))) == []


def test_request_not_applied_after_window():
    rig = Rig()
    rig.boot()
    assert rig.protect(10, entry(MODULE, R | W), apply=False) == []
    assert rig.tick(1 * S) == []                             # window is 2 s
    out = rig.tick(3 * S)
    assert rules(out) == ["request_not_applied"]
    assert out[0].evidence["requested"] == "rw-" and out[0].evidence["applied"] == "none"


def test_request_not_applied_near_miss_applied_within_window():
    rig = Rig()
    rig.boot()
    rig.protect(10, entry(MODULE, R | W), apply=False)
    rig.feed(AttrApplied(T0 + S, A, A, *MODULE, KR | KW))
    assert rig.tick(5 * S) == []


def test_request_outside_memslots_is_not_expected_applied():
    rig = Rig()
    rig.boot()
    rig.protect(10, entry((1 << 20, (1 << 20) + 1), R), apply=False)
    assert "request_not_applied" not in rules(rig.tick(5 * S))


def test_protection_unsupported_when_host_applies_nothing():
    rig = Rig(mirror=False)
    rig.boot()
    out = rig.tick(5 * S)
    assert rules(out) == ["protection_unsupported"]
    rig.protect(6 * S, entry(MODULE, R | W))
    assert rig.tick(20 * S) == []                             # reported once per VM


def test_protection_unsupported_near_miss_without_applied_hook():
    rig = Rig(hook=False)
    rig.boot()
    assert rig.tick(5 * S) == []
    status = rig.policy.status()
    assert status["pairing_active"] is False
    assert status["rules"]["request_not_applied"].startswith("inactive")


def test_applied_without_request():
    rig = Rig()
    rig.boot()
    out = rig.feed(AttrApplied(T0 + 10, A, A, *MODULE, KR | KX))
    out += rig.tick(5 * S)
    assert rules(out) == ["applied_without_request"]


def test_applied_without_request_near_miss_private_conversion():
    rig = Rig()
    rig.boot()
    rig.feed(AttrApplied(T0 + 10, A, A, 0x20000, 0x20010, KP))   # CoCo shared->private
    assert rig.tick(5 * S) == []


def fault(t, gfn, access, count=1, tgid=A, first=0):
    return Fault(T0 + t, tgid, tgid, 0, (gfn << 12) | 0x10, 0x1AA, 0xffffffff81000000,
                 access, count, first)


def test_protected_write_on_text_with_storm_count():
    rig = Rig()
    rig.boot()
    out = rig.feed(fault(10, TEXT[0] + 1, FaultAccess.WRITE, count=500))
    assert rules(out) == ["protected_write"] and out[0].count == 500
    key = (rig.host.by_tgid(A).key, "protected_write", "critical")
    assert rig.policy.counts[key] == 500


def test_protected_write_near_miss_text_poke_after_announced_writable():
    rig = Rig()
    rig.boot()
    rig.protect(10, entry(MODULE, R | W))                       # module load ...
    rig.protect(11, entry(MODULE, R | X))                       # ... sealed
    assert rules(rig.feed(fault(12, MODULE[0] + 2, FaultAccess.WRITE))) == ["protected_write"]
    rig.protect(S, entry((MODULE[0] + 2, MODULE[0] + 3), R | W))  # text_poke: make writable
    rig.protect(S + 5, entry((MODULE[0] + 2, MODULE[0] + 3), R | X))   # ... and seal again
    # the kernel reports the poke's write fault after the page went back to R_X
    assert rig.feed(fault(S + 12, MODULE[0] + 2, FaultAccess.WRITE, first=S + 1)) == []
    assert rig.policy.stats["announced_writes"] == 1
    # ... but long after the window it is a protected write again (a new dedup key: the
    # first finding's window of 60 s has not closed, so compare the counts)
    before = rig.policy.counts[(rig.host.by_tgid(A).key, "protected_write", "critical")]
    rig.feed(fault(10 * S, MODULE[0] + 2, FaultAccess.WRITE))
    assert rig.policy.counts[(rig.host.by_tgid(A).key, "protected_write", "critical")] == \
        before + 1


def test_protected_write_near_miss_default_page_and_read():
    rig = Rig()
    rig.boot()
    assert rig.feed(fault(10, 0x50000, FaultAccess.WRITE)) == []
    assert rig.feed(fault(11, TEXT[0], FaultAccess.READ)) == []


def test_protected_fetch_on_data_and_near_miss_on_text():
    rig = Rig()
    rig.boot()
    assert rules(rig.feed(fault(10, DATA[0], FaultAccess.FETCH))) == ["protected_fetch"]
    assert rig.feed(fault(11, TEXT[0], FaultAccess.FETCH)) == []


def test_cr_pin_violation_and_near_misses():
    rig = Rig()
    rig.feed(VmCreated(T0, A, A, name="web1"))
    assert rig.feed(CrWrite(T0 + 1, A, A, 4, 0)) == []              # nothing pinned yet
    rig.feed(CrPinRequest(T0 + 2, A, A, 4, (1 << 20) | (1 << 21), 0))
    assert rig.feed(CrWrite(T0 + 3, A, A, 4, (1 << 20) | (1 << 21) | 0x20)) == []
    out = rig.feed(CrWrite(T0 + 4, A, A, 4, 1 << 21))
    assert rules(out) == ["cr_pin_violation"]
    assert out[0].evidence["cleared"] == ["CR4.SMEP"]


def test_malformed_request_and_near_miss():
    rig = Rig()
    rig.boot()
    out = rig.protect(10, ProtectEntry(0x5001, 0x6000, R))
    assert rules(out) == ["malformed_request"]
    assert out[0].evidence["kinds"] == ["entry_misaligned", "rejected_EINVAL"]
    assert rig.protect(11, ProtectEntry(0x5000, 0x6000, R)) == []


def test_malformed_request_lists_every_bad_entry_by_the_guests_index():
    """The host stops at the first bad entry; the evidence names all of them, each at
    its index in the list as the guest stored it (not the host's processing order)."""
    rig = Rig()
    rig.boot()
    good = ProtectEntry(0x9000, 0xA000, R)
    stored = (good, ProtectEntry(0x7000, 0x6000, R), ProtectEntry(0x5001, 0x6000, R),
              good, ProtectEntry(0xB000, 0xC000, R | (1 << 9)))
    out = rig.feed(ProtectRequest(T0 + 10, A, A, 0x9000, stored))
    finding = next(f for f in out if f.rule == "malformed_request")
    listed = [(m["index"], m["kind"]) for m in finding.evidence["malformed_entries"]]
    assert listed == [(1, "end_before_start"), (2, "entry_misaligned"), (4, "unknown_bits")]
    assert finding.evidence["malformed_entries_total"] == 3
    # the host model's own anomaly (the first bad entry it met, processing from the end)
    # names that entry by the guest's index too
    assert [a["detail"]["index"] for a in finding.evidence["anomalies"]] == [4]


def test_malformed_entries_are_bounded_but_all_counted():
    bad = tuple(ProtectEntry(0x1001 + i * 0x1000, 0x2000 + i * 0x1000, R) for i in range(40))
    rig = Rig()
    rig.boot()
    out = rig.feed(ProtectRequest(T0 + 10, A, A, 0x9000, bad))
    finding = next(f for f in out if f.rule == "malformed_request")
    assert len(finding.evidence["malformed_entries"]) == 16
    assert finding.evidence["malformed_entries_total"] == 40


def test_map_degraded_once_per_reason():
    rig = Rig()
    rig.boot()
    out = rig.feed(Lost(T0 + 10, A, 0, "ring:control", "full", 3))
    assert rules(out) == ["map_degraded"]
    assert rig.feed(Lost(T0 + 11, A, 0, "ring:control", "full", 3)) == []


def test_flood_collapses_with_exact_count_and_does_not_delay_other_vm():
    rig = Rig()
    rig.boot(A, "noisy")
    rig.boot(B, "quiet", "u-2")
    n = 20000
    emitted = []
    for i in range(n):
        emitted += rig.feed(fault(10 + i, TEXT[0], FaultAccess.WRITE, tgid=A))
        if i == n // 2:
            other = rig.feed(fault(10 + i, TEXT[0] + 1, FaultAccess.WRITE, tgid=B))
            assert rules(other) == ["protected_write"]       # immediately, not delayed
            assert other[0].vm["name"] == "quiet"
    assert len(emitted) == 1 and emitted[0].count == 1
    st = rig.policy.vm_states[rig.host.by_tgid(A).key]
    assert len(st.dedup) == 1                                 # memory bounded
    summary = rig.tick(61 * S)
    assert len(summary) == 1                                  # only A repeated itself
    noisy = summary
    assert noisy[0].vm["name"] == "noisy" and noisy[0].count == n - 1
    assert noisy[0].evidence["total"] == n
    assert rig.policy.counts[(st.key, "protected_write", "critical")] == n


def test_rate_limit_bounds_findings_and_counts_every_one():
    rig = Rig("policy:\n  rate_limit: {findings: 10, per_seconds: 60}\n")
    rig.boot(A, "noisy")
    rig.boot(B, "quiet", "u-2")
    out = []
    for i in range(5000):   # distinct pages: dedup cannot collapse them
        out += rig.feed(fault(10 + i, DATA[0] + (i % 0x200), FaultAccess.FETCH, tgid=A))
    assert len(out) == 10
    assert rules(rig.feed(fault(20000, DATA[0], FaultAccess.FETCH, tgid=B))) == \
        ["protected_fetch"]
    st = rig.policy.vm_states[rig.host.by_tgid(A).key]
    assert len(st.dedup) <= 10
    later = rig.tick(61 * S)
    limited = [f for f in later if f.evidence.get("summary") == "rate_limited"]
    dedup = [f for f in later if f.evidence.get("summary") == "deduplicated"]
    assert sum(f.count for f in out + limited + dedup) == 5000
    assert rig.policy.counts[(st.key, "protected_fetch", "critical")] == 5000


def test_exceptions_by_name_glob_and_uuid():
    rig = Rig("policy:\n  exceptions:\n    - rules: [wx_request]\n      vms: {name: 'web*'}\n")
    rig.boot(A, "web1")
    rig.boot(B, "db1", "u-2")
    assert rig.protect(10, entry(MODULE, R | W | X), tgid=A) == []
    assert rules(rig.protect(10, entry(MODULE, R | W | X), tgid=B)) == ["wx_request"]
    assert rig.policy.stats["excepted"] == 1


def test_disabled_rule_and_severity_override():
    rig = Rig("policy:\n  rules:\n    wx_request: {enabled: false}\n"
              "    protected_write: {severity: warning}\n")
    rig.boot()
    assert rig.protect(10, entry(MODULE, R | W | X)) == []
    out = rig.feed(fault(11, TEXT[0], FaultAccess.WRITE))
    assert out[0].severity == "warning"


def test_status_names_unimplemented_rules():
    status = Rig().policy.status()
    assert status["rules"]["privileged_hypercall_from_user"].startswith("not implemented")
    assert status["rules"]["wx_request"] == "active"


def test_rule_bug_or_odd_event_shape_never_raises():
    rig = Rig()
    rig.boot()
    # entries as plain lists (a decoder that did not build ProtectEntry): the host copes,
    # a rule needing attribute access must not take the pipeline down
    ev = ProtectRequest(T0 + 10, A, A, 0x9000, ([0x5000, 0x6000, R | W | X],))
    assert rig.feed(ev) == []
    assert rig.policy.stats["internal_errors"] == 1
    assert "AttributeError" in rig.policy.last_internal_error


def testfirst_mismatch_uniform_and_split_ranges():
    from hekitrace.policy.pairing import first_mismatch
    from hekitrace.state.attrmap import AttrMap
    heki = MBEC.kvm_heki_mask
    req, app = AttrMap(), AttrMap()
    req.set(10, 20, KR | KX)
    app.set(10, 20, KR | KX | KP)                      # PRIVATE is not compared
    assert first_mismatch(req, app, 10, 20, heki) is None
    app.set(15, 17, KR | KW)
    assert first_mismatch(req, app, 10, 20, heki) == (15, 17, KR | KX, KR | KW)
    assert first_mismatch(req, app, 0, 5, heki) is None            # both default
    assert first_mismatch(req, app, 5, 12, heki) is None           # split, all equal
    req.set(3, 4, KR)
    assert first_mismatch(req, app, 0, 12, heki) == (3, 4, KR, 0)   # split, differs
