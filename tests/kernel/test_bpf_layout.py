"""bpf/hekitrace.h and hekitrace/capture/records.py declare the same record layouts:
compile the C (with -DHK_LAYOUT_MAPS: one array per record struct) and compare every
Python field's offset and size with clang's layout as bcc exposes it (ctypes leaf types)."""

from __future__ import annotations

import ctypes

import pytest

from hekitrace.capture import loader, records
from hekitrace.capture.engine import Capture

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def bpf():
    c = Capture(settings=loader.CaptureSettings(control_ring_bytes=65536,
                                                telemetry_ring_bytes=65536),
                required={"hypercall": False, "ioctl": False}, attach=False,
                extra_cflags=("-DHK_LAYOUT_MAPS",), say=lambda m: None).start()
    yield c.bpf
    c.close()


def c_layout(ctype) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every named field, nested structs flattened as a.b."""
    out = {}
    for name, ftype, *_ in ctype._fields_:
        if name.startswith("__pad"):
            continue
        off = getattr(ctype, name).offset
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            for sub, (o, s) in c_layout(ftype).items():
                out[f"{name}.{sub}"] = (off + o, s)
        else:
            out[name] = (off, ctypes.sizeof(ftype))
    return out


@pytest.mark.parametrize("name", sorted(records.LAYOUTS))
def test_python_layout_matches_c(bpf, name):
    leaf = bpf[f"hk_layout_{name}".encode()].Leaf
    c = c_layout(leaf)
    py = records.OFFSETS[name]
    assert ctypes.sizeof(leaf) == records.STRUCTS[name].size, records.C_NAMES[name]
    # every C field is declared in Python, at the same offset with the same size
    assert set(c) == set(py), records.C_NAMES[name]
    for field, (off, size) in py.items():
        assert c[field] == (off, size), f"{records.C_NAMES[name]}.{field}"
