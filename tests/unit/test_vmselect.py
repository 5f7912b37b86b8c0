"""vmselect.resolve: a VM by UUID, pid or name; unknown and ambiguous are errors that
list the candidates, never a guess."""

from __future__ import annotations

import pytest

from hekitrace.errors import VmLookupError
from hekitrace.render.vm_select import resolve

VMS = [
    {"name": "web1", "pid": 100, "uuid": "7F0C0000-0000-0000-0000-000000000001",
     "state": "destroyed"},
    {"name": "web1", "pid": 200, "uuid": "7f0c0000-0000-0000-0000-000000000002",
     "state": "running"},
    {"name": "db1", "pid": 300, "uuid": None, "state": "running"},
    {"name": "300", "pid": 400, "uuid": None, "state": "running"},  # a name that looks like a pid
]


def test_by_uuid_case_insensitive():
    assert resolve("7f0c0000-0000-0000-0000-000000000001", VMS)["pid"] == 100
    assert resolve("7F0C0000-0000-0000-0000-000000000002", VMS)["pid"] == 200


def test_by_pid_then_name():
    assert resolve("200", VMS)["name"] == "web1"
    assert resolve("300", VMS)["name"] == "db1"   # pid wins over a numeric name
    assert resolve("db1", VMS)["pid"] == 300
    assert resolve(" db1 ", VMS)["pid"] == 300


def test_ambiguous_name_lists_the_matches():
    with pytest.raises(VmLookupError) as info:
        resolve("web1", VMS)
    assert "ambiguous" in str(info.value) and "2 VMs" in str(info.value)
    assert len(info.value.choices) == 2
    assert all("uuid 7f0c" in c.lower() for c in info.value.choices)
    assert "destroyed" in info.value.choices[0]


def test_unknown_lists_every_known_vm():
    with pytest.raises(VmLookupError) as info:
        resolve("nope", VMS)
    assert "unknown VM 'nope'" in str(info.value)
    assert info.value.choices == ["web1 (pid 100)", "web1 (pid 200)", "db1 (pid 300)",
                                  "300 (pid 400)"]


def test_no_vms_and_empty_query():
    with pytest.raises(VmLookupError, match="knows no VMs"):
        resolve("web1", [])
    with pytest.raises(VmLookupError, match="no VM given"):
        resolve("  ", VMS)


def test_uuid_prefix_from_the_vms_table():
    assert resolve("7f0c0000-0000-0000-0000-00000000000", VMS[:1] + VMS[2:])["pid"] == 100
    with pytest.raises(VmLookupError, match="ambiguous"):
        resolve("7f0c0000", VMS)          # both web1 UUIDs start so
    with pytest.raises(VmLookupError, match="unknown"):
        resolve("7f0c", VMS)              # too short to be taken as a UUID prefix


def test_pid_label_names_a_vm_like_its_pid():
    """'vms' and the findings call an unnamed VM pid-N; that label must resolve."""
    assert resolve("pid-300", VMS)["name"] == "db1"
    with pytest.raises(VmLookupError, match="unknown"):
        resolve("pid-999", VMS)


def test_choices_are_bounded_with_a_count():
    many = [{"name": f"vm{i}", "pid": 1000 + i, "uuid": None, "state": "running"}
            for i in range(25)]
    with pytest.raises(VmLookupError) as info:
        resolve("nope", many)
    assert len(info.value.choices) == 11 and info.value.choices[-1] == "... and 15 more"
    twins = [{"name": "twin", "pid": 2000 + i, "uuid": None, "state": "running"}
             for i in range(12)]
    with pytest.raises(VmLookupError) as info:
        resolve("twin", twins)
    assert info.value.ambiguous and info.value.choices[-1] == "... and 2 more"
