"""Kernel struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux,
plus the split BTF of the KVM modules when KVM is not built in: :class:`KernelBtf`).

BPF programs must never take a kernel struct layout from headers (the build host's
headers are not even for the running kernel: docs/kernel-support.md section 4); the loader
asks this module for byte offsets and passes them to the C as -D constants. The BTF format is small
(Documentation/bpf/btf.rst: a header, a type section of variable-length records, a string
section), so a self-contained parser avoids depending on bpftool at run time.

Missing types or members raise :class:`~hekitrace.errors.BtfError` naming both.
"""

from __future__ import annotations

import struct

from hekitrace.errors import BtfError

BTF_MAGIC = 0xEB9F
BTF_DIR = "/sys/kernel/btf"
VMLINUX_BTF = f"{BTF_DIR}/vmlinux"
#: modules whose split BTF describes KVM types when KVM is built as modules (Debian:
#: kvm_gfn_range, kvm_vcpu and kvm_arch_post_set_memory_attributes live in "kvm")
KVM_MODULES = ("kvm", "kvm_amd", "kvm_intel")

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)

_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")
_ARRAY = struct.Struct("<III")


def _extra_size(kind: int, vlen: int) -> int:
    """Bytes of kind-specific data after a ``struct btf_type``."""
    if kind in (KIND_INT, KIND_VAR, KIND_DECL_TAG):
        return 4
    if kind in (KIND_ARRAY,):
        return 12
    if kind in (KIND_STRUCT, KIND_UNION, KIND_DATASEC, KIND_ENUM64):
        return 12 * vlen
    if kind in (KIND_ENUM, KIND_FUNC_PROTO):
        return 8 * vlen
    return 0


class Btf:
    """A parsed BTF blob: type lookup by name, member offsets (bytes), function presence."""

    def __init__(self, data: bytes, path: str = "<btf>", base: Btf | None = None) -> None:
        """Parse ``data``; with ``base``, as split BTF on top of it (a module's
        /sys/kernel/btf/<module>: its type ids continue after the base's last id and its
        string offsets after the base's string section, so the base's data and strings are
        prefixed to this blob's and ids and offsets then index them directly)."""
        self.path = path
        self.base = base
        if len(data) < _HEADER.size:
            raise BtfError(f"{path}: {len(data)} bytes is too short for a BTF header")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            _HEADER.unpack_from(data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{path}: bad BTF magic {magic:#x}, expected {BTF_MAGIC:#x}")
        shift = len(base._data) if base is not None else 0
        self._types_at = shift + hdr_len + type_off
        own_strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        if hdr_len + str_off + str_len > len(data) or hdr_len + type_off + type_len > len(data):
            raise BtfError(f"{path}: BTF sections run past the end of its {len(data)} bytes")
        self._strings: bytes = base._strings + own_strings if base is not None else own_strings
        self._data: bytes = base._data + data if base is not None else data
        data = self._data
        # type id -> (offset of its struct btf_type in _data); id 0 is void
        self._offsets: list[int] = list(base._offsets) if base is not None else [0]
        #: this blob's own named types (a split blob's base names stay in base._by_name)
        self._by_name: dict[str, list[int]] = {}
        pos, end = self._types_at, self._types_at + type_len
        unpack = _TYPE.unpack_from
        strings = self._strings
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            self._offsets.append(pos)
            if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_FUNC, KIND_TYPEDEF):
                name = strings[name_off:strings.index(b"\0", name_off)].decode()
                self._by_name.setdefault(name, []).append(len(self._offsets) - 1)
            pos += _TYPE.size + _extra_size(kind, vlen)

    @classmethod
    def load(cls, path: str = VMLINUX_BTF, base: Btf | None = None) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path, base)
        except OSError as exc:
            hint = ("the kernel needs CONFIG_DEBUG_INFO_BTF=y" if base is None else
                    "the module needs CONFIG_DEBUG_INFO_BTF_MODULES=y")
            raise BtfError(f"cannot read kernel BTF {path}: {exc.strerror}; {hint}") from exc

    def _ids(self, name: str) -> list[int]:
        """Ids named ``name``: the base's first (vmlinux before a module), then own."""
        own = self._by_name.get(name, [])
        return self.base._ids(name) + own if self.base is not None else own

    def _name(self, off: int) -> str:
        return self._strings[off:self._strings.index(b"\0", off)].decode()

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, vlen, size_or_type, offset) of ``type_id``."""
        pos = self._offsets[type_id]
        _name_off, info, size_or_type = _TYPE.unpack_from(self._data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, size_or_type, pos

    def _resolve(self, type_id: int) -> int:
        for _ in range(32):
            kind, _vlen, target, _pos = self._type(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        return type_id

    def has_struct(self, name: str) -> bool:
        try:
            self._struct_id(name)
        except BtfError:
            return False
        return True

    def has_function(self, name: str) -> bool:
        return any(self._type(t)[0] == KIND_FUNC for t in self._ids(name))

    def struct_size(self, struct_name: str) -> int:
        return self._type(self._struct_id(struct_name))[2]

    def _struct_id(self, struct_name: str) -> int:
        for type_id in self._ids(struct_name):
            kind, vlen, _size, _ = self._type(type_id)
            if kind in (KIND_STRUCT, KIND_UNION) and vlen:
                return type_id
        raise BtfError(f"{self.path}: no struct {struct_name} in the kernel's BTF")

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (``"arg.attributes"``, ``"arch.regs[16]"``) in
        ``struct_name``; anonymous struct/union members are searched through."""
        type_id = self._struct_id(struct_name)
        total = 0
        for part in path.split("."):
            index = None
            if part.endswith("]"):
                part, idx = part[:-1].split("[")
                index = int(idx)
            found = self._find_member(type_id, part)
            if found is None:
                raise BtfError(f"{self.path}: struct {struct_name} has no member {path!r} "
                               f"(missing {part!r})")
            bit_off, member_type = found
            if bit_off % 8:
                raise BtfError(f"{self.path}: {struct_name}.{path} is a bitfield")
            total += bit_off // 8
            type_id = self._resolve(member_type)
            if index is not None:
                kind, _vlen, _s, pos = self._type(type_id)
                if kind != KIND_ARRAY:
                    raise BtfError(f"{self.path}: {struct_name}.{part} is not an array")
                elem, _index_type, nelems = _ARRAY.unpack_from(self._data, pos + _TYPE.size)
                if index >= nelems:
                    raise BtfError(f"{self.path}: {struct_name}.{part}[{index}] out of "
                                   f"range ({nelems} elements)")
                elem = self._resolve(elem)
                total += index * self._sizeof(elem)
                type_id = elem
        return total

    def _sizeof(self, type_id: int) -> int:
        kind, _vlen, size, pos = self._type(type_id)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return size
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _it, nelems = _ARRAY.unpack_from(self._data, pos + _TYPE.size)
            return nelems * self._sizeof(self._resolve(elem))
        raise BtfError(f"{self.path}: cannot size BTF type {type_id} (kind {kind})")

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        kind, vlen, _size, pos = self._type(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        kind_flag = (self._type_info(type_id) >> 31) & 1
        for i in range(vlen):
            name_off, mtype, moff = _MEMBER.unpack_from(self._data, pos + _TYPE.size + 12 * i)
            bit_off = moff & 0xFFFFFF if kind_flag else moff
            if name_off and self._name(name_off) == name:
                return bit_off, mtype
            if not name_off:  # anonymous struct/union: search inside
                inner = self._find_member(self._resolve(mtype), name)
                if inner is not None:
                    return bit_off + inner[0], inner[1]
        return None

    def _type_info(self, type_id: int) -> int:
        return _TYPE.unpack_from(self._data, self._offsets[type_id])[1]


class KernelBtf:
    """vmlinux BTF plus the split BTF of the loaded KVM modules, with :class:`Btf`'s lookup
    API: a name is looked up in vmlinux first, then in each module in order.

    Debian builds KVM as modules, so its structs are only in /sys/kernel/btf/kvm; a kernel
    with KVM built in (this build host) has no module files and everything is in vmlinux.
    """

    def __init__(self, vmlinux: Btf, modules: tuple[Btf, ...] = ()) -> None:
        self.vmlinux = vmlinux
        self.modules = modules
        self.parts = (vmlinux,) + modules
        self.path = ", ".join(p.path for p in self.parts)

    @classmethod
    def load(cls, btf_dir: str = BTF_DIR, modules: tuple[str, ...] = KVM_MODULES) -> KernelBtf:
        """vmlinux (required: BtfError) and whichever of ``modules`` have a BTF file."""
        import os
        vmlinux = Btf.load(os.path.join(btf_dir, "vmlinux"))
        loaded = tuple(Btf.load(path, base=vmlinux) for path in
                       (os.path.join(btf_dir, m) for m in modules) if os.path.exists(path))
        return cls(vmlinux, loaded)

    def _with_struct(self, name: str) -> Btf:
        for part in self.parts:
            if part.has_struct(name):
                return part
        raise BtfError(f"no struct {name} in the kernel's BTF ({self.path})")

    def has_struct(self, name: str) -> bool:
        return any(p.has_struct(name) for p in self.parts)

    def has_function(self, name: str) -> bool:
        return any(p.has_function(name) for p in self.parts)

    def struct_size(self, struct_name: str) -> int:
        return self._with_struct(struct_name).struct_size(struct_name)

    def member_offset(self, struct_name: str, path: str) -> int:
        return self._with_struct(struct_name).member_offset(struct_name, path)
