"""The parts the daemon is composed of: their interfaces, and how the optional ones start.

The daemon (service/daemon.py) is given its parts by ``hekitrace daemon``
(commands/daemon.py), and tests give it fakes: the capture engine, the KVM uevent source,
start-up discovery, the journal's recovery and the alert sink. Each is described here by a
``typing.Protocol`` (what the daemon calls, nothing more), so a fake is checked against
the same interface as the real part. A part the daemon can run without (no capture, no
uevents, no journal) is ``None``: a decision of the caller, announced in one line.

:func:`start_capture` also turns the engine's hook status into the daemon's hook report:
``required`` is the config's ``hooks`` setting (the engine itself is started with every
hook optional, so a missing required hook makes the daemon "not ready", never exit).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from typing import Protocol

from hekitrace.capture import hooks
from hekitrace.capture.engine import HookStatus
from hekitrace.capture.uevents import unavailable_message
from hekitrace.config.settings import Config
from hekitrace.journal.segments import Journal
from hekitrace.pipeline import Pipeline
from hekitrace.policy.findings import Finding
from hekitrace.state.changes import VmKey
from hekitrace.state.events import Event, VmCreated

Say = Callable[[str], None]


class CaptureEngine(Protocol):
    """The BPF side (hekitrace.capture.engine.Capture): rings to read, kernel tables to
    keep in step with the state."""

    def fds(self) -> list[int]:
        """File descriptors that become readable when records wait in a ring."""

    def read(self, max_records: int | None = None) -> list[Event]:
        """Decoded events (and Lost events for kernel-side drops), at most about
        ``max_records`` ring records."""

    def hook_status(self) -> dict[str, HookStatus]:
        """How each hook attached (or why not)."""

    def protect_filter_update(self, tgid: int, ranges: Iterable[tuple[int, int, int]]) -> int:
        """Replace the kernel's fault filter of VMM ``tgid``."""

    def seed_memslots(self, tgid: int, slots: Iterable[tuple[int, int, int, int]]) -> int:
        """Teach the kernel's page-list walk the memslots of VMM ``tgid``."""

    def forget_vm(self, tgid: int) -> list[Event]:
        """Drop a retired VM's kernel state; returns its last Lost events."""

    def close(self) -> None:
        """Detach every program (idempotent)."""


class EventSource(Protocol):
    """A pollable source of lifecycle events (hekitrace.capture.uevents.UeventSource)."""

    def fileno(self) -> int:
        """The fd to poll for reading."""

    def read_events(self) -> list[Event]:
        """What arrived (empty when nothing did); never blocks."""

    def close(self) -> None:
        """Close the socket."""


class Recovery(Protocol):
    """The journal's start-up seam (hekitrace.journal.recovery.JournalRecovery).

    Called once with the fresh pipeline and the VMs discovery found running, it rebuilds
    what it knows into the pipeline and returns the keys of the running VMs it covers
    (neither re-created nor marked "running before monitoring started"). ``journal`` is
    then the running journal (None when it keeps none).
    """

    @property
    def journal(self) -> Journal | None:
        """The journal the daemon flushes after each batch and closes last."""

    def __call__(self, pipeline: Pipeline, discovered: list[VmCreated]) -> set[VmKey]:
        """Restore state into ``pipeline``; the covered running VMs."""


class AlertWriter(Protocol):
    """Where findings go (hekitrace.service.alerts.AlertSink)."""

    def write(self, finding: Finding) -> bool:
        """Write one finding; False when it could not be written (counted by the sink)."""

    def reopen(self) -> None:
        """Reopen the alert file (SIGHUP, logrotate)."""

    def close(self) -> None:
        """Flush and close."""


#: builds and starts the capture engine from the config; may raise (compile, attach)
CaptureFactory = Callable[[Config, Say], CaptureEngine]
#: opens the uevent source; may raise (no netlink, no pyroute2)
EventSourceFactory = Callable[[], EventSource]
#: the VMs running now (start-up discovery)
Discover = Callable[[], Iterable[VmCreated]]
#: (config, applied hook active) -> a new pipeline
PipelineFactory = Callable[[Config, bool], Pipeline]
#: config path (None: defaults) -> config; raises ConfigError or OSError
ConfigLoader = Callable[[str | None], Config]


def unattached(config: Config, reason: str) -> list[HookStatus]:
    """The hook report when no capture engine runs: every hook not attached, ``reason``."""
    return [HookStatus(hook, config.hook_required(hook), False, "none", reason)
            for hook in hooks.NAMES]


def hook_report(config: Config, status: dict[str, HookStatus]) -> list[HookStatus]:
    """The engine's hook status with ``required`` taken from the config."""
    return [HookStatus(hook, config.hook_required(hook), st.attached,
                       st.method if st.attached else "none", st.reason)
            for hook, st in status.items()]


def release_freed_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``).

    bcc's compile and load (clang and LLVM inside libbcc) leaves about 25-30 MiB of freed
    heap that the process would otherwise keep resident for its whole life (bench/
    bench_memory.py --with-bcc). False where there is no glibc (nothing done)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def start_capture(factory: CaptureFactory | None, config: Config, say: Say
                  ) -> tuple[CaptureEngine | None, list[HookStatus]]:
    """Start the capture engine; (engine or None, hook report), announced in the log.

    Without a factory the daemon sees only KVM uevents; when the engine fails to start
    (e.g. the BPF programs do not compile on this kernel) the daemon keeps serving
    metrics, the control socket and uevents, and says loudly that nothing is attached.
    """
    if factory is None:
        say("WARNING: no capture engine available; no BPF hooks attached, "
            "the daemon sees only KVM uevents")
        return None, unattached(config, "no capture engine")
    try:
        capture = factory(config, say)
    except Exception as error:  # noqa: BLE001 - bcc raises bare Exception too
        say(f"ERROR: BPF capture failed to start ({type(error).__name__}): {error}")
        return None, unattached(config, f"capture failed: {str(error)[:200]}")
    release_freed_heap()
    report = hook_report(config, capture.hook_status())
    for st in report:
        state = f"attached ({st.method})" if st.attached else f"NOT attached: {st.reason}"
        say(f"hook {st.hook:<20} {'required' if st.required else 'optional'}  {state}")
    return capture, report


def open_uevents(factory: EventSourceFactory | None, say: Say) -> EventSource | None:
    """Open the KVM uevent source, or say in one line why the daemon goes on without."""
    if factory is None:
        say("WARNING: no KVM uevent source; VM creation/destruction comes only "
            "from the ioctl hooks")
        return None
    try:
        return factory()
    except Exception as error:  # noqa: BLE001 - an optional source must not stop us
        say(f"WARNING: {unavailable_message(error)}")  # the same line as `record`
        return None


def applied_unobserved(report: list[HookStatus]) -> str | None:
    """Why this host's applied maps cannot be seen (for snapshots), or None."""
    row = next((h for h in report if h.hook == "attr_applied"), None)
    if row is not None and row.attached:
        return None
    return ("the attribute hook is not attached"
            + (f": {row.reason}" if row is not None and row.reason else ""))
