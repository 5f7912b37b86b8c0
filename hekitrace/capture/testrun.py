"""BPF_PROG_TEST_RUN through bpf(2), for tests and benchmarks.

libbcc does not export ``bpf_prog_test_run_opts`` (docs/kernel-support.md section 1), so this issues
``bpf(BPF_PROG_TEST_RUN = 10, union bpf_attr *, size)`` with ctypes. On this host the
KVM tracepoints never fire, so tests drive the raw-tracepoint programs this way
(ctx = the tracepoint's arguments as u64[]) and flood rings with an XDP program run with
``repeat``. The program runs in the calling task, so ``bpf_get_current_pid_tgid`` and
``bpf_probe_read_user`` see the caller: a test that is also the VMM is read like a real one.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import NamedTuple

from hekitrace.errors import HekitraceError

BPF_PROG_TEST_RUN = 10
#: union bpf_attr.test (include/uapi/linux/bpf.h): prog_fd, retval, data_size_in,
#: data_size_out, data_in, data_out, repeat, duration, ctx_size_in, ctx_size_out, ctx_in,
#: ctx_out, flags, cpu, batch_size
_TEST_ATTR = struct.Struct("<IIIIQQIIIIQQIII")
_ATTR_BYTES = 80
#: x86-64 syscall number of bpf(2)
SYS_BPF_X86_64 = 321


class TestRunError(HekitraceError):
    """BPF_PROG_TEST_RUN failed; ``errno`` is the kernel's error."""

    def __init__(self, message: str, *, errno: int) -> None:
        self.errno = errno
        super().__init__(message)


class TestRunResult(NamedTuple):
    retval: int
    duration_ns: int


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _run(prog_fd: int, *, data: bytes = b"", ctx: bytes = b"", repeat: int = 0) -> TestRunResult:
    data_buf = ctypes.create_string_buffer(data, len(data)) if data else None
    out_buf = ctypes.create_string_buffer(max(len(data), 1) + 256) if data else None
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    _TEST_ATTR.pack_into(
        attr, 0, prog_fd, 0, len(data), len(out_buf) if out_buf else 0,
        ctypes.addressof(data_buf) if data_buf else 0,
        ctypes.addressof(out_buf) if out_buf else 0,
        repeat, 0, len(ctx), 0, ctypes.addressof(ctx_buf) if ctx_buf else 0, 0, 0, 0, 0)
    libc = _libc()
    rc = libc.syscall(SYS_BPF_X86_64, BPF_PROG_TEST_RUN, attr, _ATTR_BYTES)
    if rc != 0:
        err = ctypes.get_errno()
        raise TestRunError(f"BPF_PROG_TEST_RUN on prog fd {prog_fd} failed: "
                           f"{os.strerror(err)}", errno=err)
    fields = _TEST_ATTR.unpack_from(attr, 0)
    return TestRunResult(retval=fields[1], duration_ns=fields[7])


def run_raw_tracepoint(prog_fd: int, args: list[int] | tuple[int, ...]) -> TestRunResult:
    """Run a raw-tracepoint program once with ``args`` (u64 each) as its arguments."""
    ctx = struct.pack(f"<{len(args)}Q", *[a & 0xFFFFFFFFFFFFFFFF for a in args])
    return _run(prog_fd, ctx=ctx)


def run_xdp(prog_fd: int, repeat: int, packet: bytes = b"\0" * 64) -> TestRunResult:
    """Run an XDP program ``repeat`` times on ``packet`` (at least an Ethernet header)."""
    return _run(prog_fd, data=packet, repeat=repeat)


BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
#: struct bpf_prog_info (include/uapi/linux/bpf.h): run_time_ns and run_cnt follow
#: prog_tags at byte 192 (stable UAPI: fields are only ever appended)
_PROG_INFO_BYTES = 232
_RUN_TIME_OFFSET = 192


class ProgStats(NamedTuple):
    run_time_ns: int
    run_cnt: int


def prog_stats(prog_fd: int) -> ProgStats:
    """Cumulative kernel run time and run count of a program (needs stats enabled)."""
    info = ctypes.create_string_buffer(_PROG_INFO_BYTES)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, prog_fd, _PROG_INFO_BYTES, ctypes.addressof(info))
    if _libc().syscall(SYS_BPF_X86_64, BPF_OBJ_GET_INFO_BY_FD, attr, 16) != 0:
        err = ctypes.get_errno()
        raise TestRunError(f"BPF_OBJ_GET_INFO_BY_FD on prog fd {prog_fd} failed: "
                           f"{os.strerror(err)}", errno=err)
    return ProgStats(*struct.unpack_from("<QQ", info, _RUN_TIME_OFFSET))


def enable_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run-time stats are on while the returned fd
    is open (the same as sysctl kernel.bpf_stats_enabled=1, without changing the host's
    setting for good). Close the fd to turn them off."""
    attr = ctypes.create_string_buffer(struct.pack("<I", BPF_STATS_RUN_TIME), 8)
    fd = _libc().syscall(SYS_BPF_X86_64, BPF_ENABLE_STATS, attr, 8)
    if fd < 0:
        err = ctypes.get_errno()
        raise TestRunError(f"BPF_ENABLE_STATS failed: {os.strerror(err)}", errno=err)
    return fd
