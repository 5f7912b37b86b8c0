"""Kernel struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BPF programs must never take a kernel struct layout from headers (the build host's
headers are not even for the running kernel: build-host.md); the loader asks this module
for byte offsets and passes them to the C as -D constants. The BTF format is small
(Documentation/bpf/btf.rst: a header, a type section of variable-length records, a string
section), so a self-contained parser avoids depending on bpftool at run time.

Missing types or members raise :class:`~hekitrace.errors.BtfError` naming both.
"""

from __future__ import annotations

import struct

from hekitrace.errors import BtfError

BTF_MAGIC = 0xEB9F
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

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

    def __init__(self, data: bytes, path: str = "<btf>") -> None:
        self.path = path
        if len(data) < _HEADER.size:
            raise BtfError(f"{path}: {len(data)} bytes is too short for a BTF header")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            _HEADER.unpack_from(data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{path}: bad BTF magic {magic:#x}, expected {BTF_MAGIC:#x}")
        self._types_at = hdr_len + type_off
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._data = data
        # type id -> (offset of its struct btf_type); id 0 is void
        self._offsets: list[int] = [0]
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
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as exc:
            raise BtfError(f"cannot read kernel BTF {path}: {exc.strerror}; the kernel "
                           "needs CONFIG_DEBUG_INFO_BTF=y") from exc

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

    def has_function(self, name: str) -> bool:
        return any(self._type(t)[0] == KIND_FUNC for t in self._by_name.get(name, ()))

    def struct_size(self, struct_name: str) -> int:
        return self._type(self._struct_id(struct_name))[2]

    def _struct_id(self, struct_name: str) -> int:
        for type_id in self._by_name.get(struct_name, ()):
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
