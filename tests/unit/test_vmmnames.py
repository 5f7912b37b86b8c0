"""vmmnames: VM identity from fixture /proc trees and hand-written command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from hekitrace.capture.vmmnames import MAX_NAME_CHARS, VmIdentity, identify, identity_from

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc" / "host1" / "proc"


def _argv(*args: str) -> bytes:
    """A cmdline as /proc holds it: NUL-terminated arguments."""
    return b"".join(arg.encode() + b"\0" for arg in args)


@pytest.mark.parametrize("pid, expected", [
    (1001, VmIdentity("web1", "8f4f5a4e-2a0b-4c8e-9a57-3d1c1b9e0a01", "qemu", "cmdline", 1001)),
    (1002, VmIdentity("db,primary", "", "qemu", "cmdline", 1002)),
    (1003, VmIdentity("mail-server", "", "qemu", "cgroup", 1003)),
    (1004, VmIdentity("fc-42", "", "firecracker", "cmdline", 1004)),
    (1005, VmIdentity("build7", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "cloud-hypervisor",
                      "cmdline", 1005)),
    (1006, VmIdentity("term1", "", "crosvm", "cmdline", 1006)),
    (1007, VmIdentity("", "", "", "pid", 1007)),
])
def test_identify_fixture_vmms(pid, expected):
    assert identify(pid, PROC) == expected


def test_identify_vanished_process_falls_back_to_pid():
    who = identify(4242, PROC)
    assert who == VmIdentity("", "", "", "pid", 4242)
    assert who.label() == "pid-4242"


def test_label_is_the_name_when_known():
    assert identify(1001, PROC).label() == "web1"


@pytest.mark.parametrize("argv, name", [
    (("qemu-system-x86_64", "-name", "plain"), "plain"),
    (("qemu-system-x86_64", "--name", "guest=dash2"), "dash2"),
    (("qemu-system-x86_64", "-name", "process=p,guest=late"), "late"),
    (("qemu-system-x86_64", "-name", "process=onlyproc"), ""),
    (("qemu-system-x86_64", "-name", "a,,b,,c"), "a,b,c"),
    (("qemu-system-x86_64", "-name"), ""),  # option without its value
    (("qemu-system-x86_64", "-name", "first", "-name", "second"), "second"),  # QEMU: last wins
])
def test_qemu_name_forms(argv, name):
    assert identity_from(1, _argv(*argv)).name == name


def test_libvirt_scope_unescapes_systemd_hex():
    who = identity_from(5, b"", "qemu-system-x86\n",
                        "0::/machine.slice/machine-qemu\\x2d12\\x2da\\x2db\\x2dc.scope/emulator\n")
    assert (who.name, who.vmm, who.source) == ("a-b-c", "qemu", "cgroup")


def test_cmdline_name_wins_over_truncated_scope():
    who = identity_from(5, _argv("qemu-system-x86_64", "-name", "guest=long-name-in-full"),
                        "", "0::/machine.slice/machine-qemu\\x2d3\\x2dlong\\x2dna.scope/x\n")
    assert (who.name, who.source) == ("long-name-in-full", "cmdline")


def test_hostile_argv_is_bounded_and_printable():
    evil = "guest=" + "\x1b[31m" + "A" * 10_000 + "\n"
    who = identity_from(9, _argv("qemu-system-x86_64", "-name", evil, "-uuid", "\x00x"))
    assert len(who.name) == MAX_NAME_CHARS
    assert who.name.isprintable()


def test_invalid_utf8_argv_does_not_raise():
    who = identity_from(9, b"qemu-system-x86_64\0-name\0\xff\xfe\x80\0")
    assert who.vmm == "qemu"
    assert who.name == "\ufffd" * 3


def test_comm_identifies_vmm_when_argv0_was_rewritten():
    who = identity_from(9, _argv("renamed", "--id", "x"), "firecracker\n")
    assert (who.vmm, who.name) == ("firecracker", "x")


def test_cloud_hypervisor_bare_socket_path():
    who = identity_from(9, _argv("cloud-hypervisor", "--api-socket", "/run/vm3.sock"))
    assert who.name == "vm3"


def test_empty_cmdline_and_no_cgroup_gives_pid():
    assert identity_from(77, b"") == VmIdentity("", "", "", "pid", 77)
