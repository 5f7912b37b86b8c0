"""hekitrace.service.control_ops: control replies built from a real Host (no sockets)."""

from __future__ import annotations

import pytest

from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.errors import VmLookupError
from hekitrace.render.documents import vm_summary
from hekitrace.render.vm_select import resolve
from hekitrace.service.control import RequestError
from hekitrace.service.control_ops import answer, find_vm, findings_count
from hekitrace.state.events import AttrApplied, Memslot, VmCreated, VmDestroyed
from hekitrace.state.host import Host

T0 = 1_795_000_000_000_000_000


def _host():
    h = Host(DEFAULT_PROFILE)
    h.apply(VmCreated(T0, 10, 10, vm_fd=3, name="web", uuid="u-web"))
    h.apply(Memslot(T0, 10, 10, 0, 0, 0, 1 << 30, 0))
    h.apply(AttrApplied(T0 + 1, 10, 10, 0x1000, 0x1800, DEFAULT_PROFILE.guest_to_kvm(0b1101)))
    h.apply(VmCreated(T0, 20, 20, vm_fd=3, name="db", uuid="u-db"))
    h.apply(VmCreated(T0, 30, 30, vm_fd=3, name="twin"))
    h.apply(VmCreated(T0, 31, 31, vm_fd=3, name="twin"))
    return h


@pytest.mark.parametrize("selector,pid", [("web", 10), ("u-db", 20), ("20", 20), (10, 10)])
def test_controlops_find_vm_by_name_uuid_pid(selector, pid):
    assert find_vm(_host().guests.values(), selector).pid == pid


def test_controlops_find_vm_errors():
    guests = _host().guests.values()
    with pytest.raises(RequestError) as info:
        find_vm(guests, "nope")
    assert info.value.code == "unknown_vm" and len(info.value.choices) == 4
    with pytest.raises(RequestError) as info:
        find_vm(guests, "twin")
    assert info.value.code == "ambiguous_vm" and len(info.value.choices) == 2
    for bad in (None, "", True, ["web"], {"a": 1}):
        with pytest.raises(RequestError) as info:
            find_vm(guests, bad)
        assert info.value.code == "bad_request"


def test_controlops_a_namesake_in_grace_is_ambiguous_not_guessed():
    """One rule for the daemon and --from (render.vm_select): a VM recreated under its
    name while the old one is in its grace period must be named by pid or UUID."""
    h = _host()
    h.apply(VmDestroyed(T0 + 5, 10, 10))
    h.apply(VmCreated(T0 + 6, 11, 11, vm_fd=3, name="web"))
    with pytest.raises(RequestError) as info:
        find_vm(h.guests.values(), "web")
    assert info.value.code == "ambiguous_vm"
    assert any("destroyed" in c for c in info.value.choices)
    assert find_vm(h.guests.values(), "11").pid == 11
    assert find_vm(h.guests.values(), "pid-11").pid == 11


def test_controlops_daemon_and_from_resolve_alike():
    """The daemon's resolver and the one behind --from, on the same VMs, agree on every
    query: name, pid-N label of an unnamed VM, pid, UUID in any case, 8-char prefix."""
    h = _host()
    h.apply(VmCreated(T0, 40, 40, vm_fd=3))                       # no name: "pid-40"
    h.apply(VmCreated(T0, 50, 50, vm_fd=3, name="cfg",
                      uuid="7f0c2a1e-0000-4000-8000-00000000abcd"))
    rows = [vm_summary(g, DEFAULT_PROFILE) for g in h.guests.values()]
    queries = ["web", "u-db", "20", "pid-40", "40", "7F0C2A1E-0000-4000-8000-00000000ABCD",
               "7f0c2a1e", "7F0C2A1E", "twin", "nope", "pid-99", "7f0c"]
    for query in queries:
        try:
            daemon = ("ok", find_vm(h.guests.values(), query).pid)
        except RequestError as error:
            daemon = (error.code, sorted(error.choices))
        try:
            offline = ("ok", resolve(query, rows)["pid"])
        except VmLookupError as error:
            offline = ("ambiguous_vm" if error.ambiguous else "unknown_vm",
                       sorted(error.choices))
        assert daemon == offline, query
    assert find_vm(h.guests.values(), "pid-40").pid == 40
    assert find_vm(h.guests.values(), "7F0C2A1E").pid == 50


def test_controlops_vms_and_snapshot():
    h = _host()
    web = h.by_tgid(10)
    counts = {(web.key, "wx_request", "critical"): 2, (None, "x", "info"): 1}
    rows = answer({"op": "vms"}, h, DEFAULT_PROFILE, counts, {})["vms"]
    assert len(rows) == 4
    assert findings_count(counts, web) == 2
    snap = answer({"op": "snapshot", "vm": "web", "maps": ["applied"]}, h, DEFAULT_PROFILE,
                  counts, {web.key: []})
    # the snapshot is of the VM asked for, limited to the map asked for, and holds
    # exactly the one applied range (gfn 0x1000-0x1800, r-x immutable) and its memslot
    assert (snap["vm"]["name"], snap["vm"]["uuid"], snap["vm"]["pid"]) == ("web", "u-web", 10)
    assert snap["maps"] == ["applied"]
    assert [(r["gfn_start"], r["gfn_end"], r["pages"]) for r in snap["ranges"]] == \
        [(0x1000, 0x1800, 0x800)]
    (rng,) = snap["ranges"]
    assert rng["applied"]["class"] == "r-x_immutable" and "requested" not in rng
    assert rng["applied"]["value"] == DEFAULT_PROFILE.guest_to_kvm(0b1101)
    assert snap["vm"]["memory"]["applied"] == {"r-x_immutable": {"pages": 0x800,
                                                                  "bytes": 0x800 * 4096}}
    assert snap["vm"]["memory"]["requested"] == {}
    assert [m["slot"] for m in snap["memslots"]] == [0] and snap["findings"] == []
    assert snap["ranges_truncated"] is False and snap["differing_ranges"] == 0


@pytest.mark.parametrize("request_", [
    {"op": "snapshot", "vm": "web", "maps": ["bogus"]},
    {"op": "snapshot", "vm": "web", "maps": "applied"},
    {"op": "snapshot", "vm": "web", "maps": []},
    {"op": "snapshot", "vm": "web", "maps": [1]},
    {"op": "frobnicate"},
])
def test_controlops_bad_requests(request_):
    with pytest.raises(RequestError) as info:
        answer(request_, _host(), DEFAULT_PROFILE, {}, {})
    assert info.value.code == "bad_request"
