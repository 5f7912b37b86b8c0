"""Split BTF (a module's /sys/kernel/btf/<module> on top of vmlinux), from hand-built blobs.

Debian builds KVM as modules: struct kvm_gfn_range lives in /sys/kernel/btf/kvm, whose type
ids continue after vmlinux's and whose string offsets continue after vmlinux's string
section. These blobs follow Documentation/bpf/btf.rst byte for byte, so the parser is
checked against the format, not against itself.
"""

from __future__ import annotations

import struct

import pytest

from hekitrace.capture.btf import Btf, KernelBtf
from hekitrace.errors import BtfError

KIND_INT, KIND_STRUCT, KIND_UNION, KIND_FUNC, KIND_FUNC_PROTO = 1, 4, 5, 12, 13


class _Strings:
    """A BTF string section whose offsets start at ``start`` (a split blob: base str_len)."""

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.data = bytearray(b"" if start else b"\0")
        self.at: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self.at:
            self.at[name] = self.start + len(self.data)
            self.data += name.encode() + b"\0"
        return self.at[name]


def _info(kind: int, vlen: int = 0) -> int:
    return (kind << 24) | vlen


def _blob(types: bytes, strings: bytes) -> bytes:
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def _base() -> tuple[bytes, int, _Strings]:
    """vmlinux-like base: 1 = u64, 2 = struct kvm_vcpu {u64 pad; u64 vcpu_id}."""
    s = _Strings()
    types = struct.pack("<III", s("u64"), _info(KIND_INT), 8) + struct.pack("<I", 64)
    types += struct.pack("<III", s("kvm_vcpu"), _info(KIND_STRUCT, 2), 16)
    types += struct.pack("<III", s("pad"), 1, 0) + struct.pack("<III", s("vcpu_id"), 1, 64)
    return _blob(types, bytes(s.data)), 2, s


def _split(base_types: int, base_str_len: int) -> bytes:
    """kvm-like split blob: ids from base_types + 1, strings from base_str_len.

    3 = union {u64 attributes}, 4 = struct kvm_gfn_range {u64 slot; u64 start; u64 end;
    union arg}, 5 = func_proto, 6 = func kvm_arch_post_set_memory_attributes. It reuses
    base type 1 (u64) and base string "u64" is never repeated.
    """
    s = _Strings(base_str_len)
    u, g, proto = base_types + 1, base_types + 2, base_types + 3
    types = struct.pack("<III", 0, _info(KIND_UNION, 1), 8)
    types += struct.pack("<III", s("attributes"), 1, 0)
    types += struct.pack("<III", s("kvm_gfn_range"), _info(KIND_STRUCT, 4), 32)
    for name, tid, bits in (("slot", 1, 0), ("start", 1, 64), ("end", 1, 128), ("arg", u, 192)):
        types += struct.pack("<III", s(name), tid, bits)
    types += struct.pack("<III", 0, _info(KIND_FUNC_PROTO, 0), 0)
    types += struct.pack("<III", s("kvm_arch_post_set_memory_attributes"), _info(KIND_FUNC),
                         proto)
    assert g == base_types + 2
    return _blob(types, bytes(s.data))


def _pair(tmp_path):
    base, ntypes, strings = _base()
    (tmp_path / "vmlinux").write_bytes(base)
    (tmp_path / "kvm").write_bytes(_split(ntypes, len(strings.data)))
    return tmp_path


def test_split_blob_resolves_module_types_over_base_ids_and_strings(tmp_path):
    d = _pair(tmp_path)
    vmlinux = Btf.load(str(d / "vmlinux"))
    kvm = Btf.load(str(d / "kvm"), base=vmlinux)
    assert kvm.member_offset("kvm_gfn_range", "start") == 8
    assert kvm.member_offset("kvm_gfn_range", "end") == 16
    assert kvm.member_offset("kvm_gfn_range", "arg.attributes") == 24
    assert kvm.struct_size("kvm_gfn_range") == 32
    assert kvm.has_function("kvm_arch_post_set_memory_attributes")
    # base types stay reachable through the split blob, and the base is not changed
    assert kvm.member_offset("kvm_vcpu", "vcpu_id") == 8
    assert not vmlinux.has_struct("kvm_gfn_range")
    with pytest.raises(BtfError, match="no struct kvm_gfn_range"):
        vmlinux.member_offset("kvm_gfn_range", "start")


def test_kernel_btf_looks_in_vmlinux_then_modules(tmp_path):
    d = _pair(tmp_path)
    kbtf = KernelBtf.load(str(d), modules=("kvm", "kvm_amd", "kvm_intel"))
    assert [p.path for p in kbtf.parts] == [str(d / "vmlinux"), str(d / "kvm")]
    assert kbtf.member_offset("kvm_gfn_range", "arg.attributes") == 24
    assert kbtf.member_offset("kvm_vcpu", "vcpu_id") == 8
    assert kbtf.has_function("kvm_arch_post_set_memory_attributes")
    with pytest.raises(BtfError, match=r"no struct nope .*vmlinux.*kvm"):
        kbtf.member_offset("nope", "x")
    with pytest.raises(BtfError, match="no member 'nope'"):
        kbtf.member_offset("kvm_gfn_range", "nope")


def test_without_module_files_only_vmlinux_is_read(tmp_path):
    base, _n, _s = _base()
    (tmp_path / "vmlinux").write_bytes(base)
    kbtf = KernelBtf.load(str(tmp_path))
    assert kbtf.modules == ()
    assert not kbtf.has_function("kvm_arch_post_set_memory_attributes")


def test_truncated_split_blob_is_a_btf_error(tmp_path):
    d = _pair(tmp_path)
    data = (d / "kvm").read_bytes()
    (d / "kvm").write_bytes(data[:40])
    with pytest.raises(BtfError, match="past the end"):
        KernelBtf.load(str(d))


def test_6_1_like_kernel_has_no_attr_offsets_but_the_rest_resolves(tmp_path):
    """6.1: kvm_gfn_range without arg.attributes. kernel_offsets(attr=False) gives -1 for
    the attr hook's offsets and still resolves kvm_vcpu; attr=True names what is missing."""
    from hekitrace.capture import loader
    base, _n, _s = _base()
    (tmp_path / "vmlinux").write_bytes(base)
    kbtf = KernelBtf.load(str(tmp_path))
    with pytest.raises(BtfError, match="kvm_gfn_range"):
        loader.kernel_offsets(kbtf)
    offs = loader.kernel_offsets(kbtf, attr=False)
    assert offs["HK_GFN_RANGE_ATTR_OFF"] == offs["HK_GFN_RANGE_START_OFF"] == -1
    assert offs["HK_VCPU_ID_OFF"] == 8
