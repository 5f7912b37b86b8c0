"""The capture engine: compile once, attach each hook by its preference chain, read both
rings, hand out event batches, keep the kernel-side fault filter in sync.

Hooks and their chains of attach methods are the table in :mod:`hekitrace.capture.hooks`.
What worked (or why not) is in :meth:`Capture.hook_status`; a required hook that attaches
by no method raises AttachError naming hook and methods.

Usage::

    cap = Capture(config).start()
    for fd in cap.fds(): selector.register(fd, ...)
    events = cap.read()          # control ring first, then telemetry, then losses
    for batch in cap.batches(timeout_seconds=10): ...   # or let it poll
    cap.protect_filter_update(tgid, [(gfn_start, gfn_end), ...])
    cap.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hekitrace.capture import hooks, loader, records
from hekitrace.capture.assemble import LossTracker, ProtectAssembler
from hekitrace.capture.btf import KernelBtf
from hekitrace.capture.hooks import ATTR_FUNCTION
from hekitrace.config.abi import DEFAULT_PROFILE, AbiProfile
from hekitrace.errors import AttachError, BtfError
from hekitrace.state.events import Event, Fault, FaultAccess

#: how often read() looks at the kernel's drop counters (a syscall per counter key)
LOSS_POLL_SECONDS = 0.1
#: FaultAccess bits reported for a filtered page unless the caller says otherwise
REPORT_WRITE_FETCH = int(FaultAccess.WRITE | FaultAccess.FETCH)


@dataclass
class HookStatus:
    """How one hook attached: ``method`` ("raw_tracepoint", "kprobe"...) or "none"
    with ``reason`` (every method tried and why it failed)."""

    hook: str
    required: bool
    attached: bool = False
    method: str = "none"
    reason: str = ""


def _boot_to_epoch_ns() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Capture:
    """Owns the BPF object; see the module docstring."""

    def __init__(self, config=None, *, abi: AbiProfile | None = None,
                 settings: loader.CaptureSettings | None = None,
                 required: dict[str, bool] | None = None,
                 dump_source: bool = False, extra_cflags: Iterable[str] = (),
                 attach: bool = True, tracefs: str = loader.TRACEFS,
                 say: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.abi = abi or (config.abi_profile() if config is not None else DEFAULT_PROFILE)
        self.settings = settings or (loader.CaptureSettings.from_config(config)
                                     if config is not None else loader.CaptureSettings())
        req = dict(hooks.DEFAULT_REQUIRED)
        if config is not None:
            for hook in hooks.NAMES:
                value = getattr(config.hooks, hook, None)
                if value is not None:
                    req[hook] = value == "required"
                    if value == "disabled":
                        req[hook] = False
        if required:
            req.update(required)
        self._disabled = {h for h in hooks.NAMES if config is not None
                          and getattr(config.hooks, h, None) == "disabled"}
        self._required = req
        self._dump = dump_source
        self._extra = tuple(extra_cflags)
        self._attach = attach
        self._tracefs = tracefs
        self._say = say or (lambda msg: print(f"hekitrace: {msg}", file=sys.stderr))
        self._status = {h: HookStatus(h, req[h]) for h in hooks.NAMES}
        self.bpf: Any = None
        self.cflags: list[str] = []
        self._readers: list[Any] = []
        self._numbers = records.HypercallNumbers.from_profile(self.abi)
        self._assembler = ProtectAssembler()
        self._losses = LossTracker()
        self.decode_stats = records.DecodeStats()
        self._filter_keys: dict[int, list[int]] = {}
        self._next_storm_flush = 0.0
        self._next_loss_poll = 0.0
        #: why the attr hook cannot attach whatever the method ("" = it may)
        self._attr_error = ""

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> Capture:
        """Compile, load and attach; raise AttachError for a required hook that failed."""
        btf = KernelBtf.load()   # vmlinux + the KVM modules' split BTF (Debian: kvm=m)
        # e.g. 6.1: no kvm_arch_post_set_memory_attributes, no arg.attributes: the
        # attr hook only; the reason is the one 'hekitrace check' gives
        self._attr_error = loader.attr_hook_blocker(btf)
        try:   # the offsets are wanted whenever BTF has them (the test-run twin reads them)
            offsets = loader.kernel_offsets(btf)
        except BtfError:
            offsets = loader.kernel_offsets(btf, attr=False)
        vendor = loader.detect_vendor(self.settings.vendor, say=self._say)
        hz = loader.kernel_hz(say=self._say)
        extra = list(self._extra)
        want_fentry = (self._attach and "attr_applied" not in self._disabled
                       and not self._attr_error and btf.has_function(ATTR_FUNCTION))
        self.cflags = loader.build_cflags(self.settings, self.abi, offsets, vendor, hz,
                                          tuple(extra + (["-DHK_WITH_FENTRY"] if want_fentry
                                                         else [])))
        fentry_error = "" if want_fentry else (self._attr_error or
                                               f"{ATTR_FUNCTION} not in the kernel's BTF")
        try:
            self.bpf = loader.compile_bpf(self.cflags, self._dump)
        except AttachError as exc:
            if not want_fentry:
                raise
            # bcc attaches KFUNC_PROBE while compiling: a refused fentry fails the compile
            fentry_error = str(exc).splitlines()[0][:200]
            self._say(f"attr_applied: fentry refused ({fentry_error}); recompiling for kprobe")
            self.cflags = loader.build_cflags(self.settings, self.abi, offsets, vendor, hz,
                                              tuple(extra))
            self.bpf = loader.compile_bpf(self.cflags, self._dump)
            want_fentry = False
        try:
            if self._attach:
                self._attach_all(want_fentry, fentry_error)
            self._open_rings()
        except BaseException:
            self.close()     # detach what did attach: a failed start leaves nothing behind
            raise
        return self

    def _try(self, hook: str, chain: list[tuple[str, Callable[[], None]]]) -> None:
        st = self._status[hook]
        if hook in self._disabled:
            st.reason = "disabled in config"
            return
        errors = []
        for method, fn in chain:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 (bcc raises plain Exception; try the next method)
                errors.append(f"{method}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                continue
            st.attached, st.method, st.reason = True, method, "; ".join(errors)
            return
        st.reason = "; ".join(errors)
        if st.required:
            raise AttachError(f"required hook attaches by no method ({st.reason})", hook=hook,
                              method="/".join(m for m, _ in chain))

    def _attach_all(self, fentry_attached: bool, fentry_error: str) -> None:
        """Attach every hook of the table by the first of its methods that works."""
        for hook in hooks.HOOKS:
            self._try(hook.name, [(m.kind, self._attacher(m, fentry_attached, fentry_error))
                                  for m in hook.methods])

    def _attacher(self, method: hooks.Method, fentry_attached: bool,
                  fentry_error: str) -> Callable[[], None]:
        """A call that attaches ``method``'s programs (raises when it cannot)."""
        b = self.bpf
        kind = method.kind

        def go() -> None:
            if kind == "fentry":           # attached by bcc while compiling, or not at all
                if not fentry_attached:
                    raise AttachError(fentry_error)
                return
            if kind == "kprobe" and self._attr_error:   # its offsets are -1: never read garbage
                raise AttachError(self._attr_error)
            for point, fn in method.programs:
                if kind == "raw_tracepoint":
                    b.attach_raw_tracepoint(tp=point.encode(), fn_name=fn.encode())
                elif kind == "tracepoint":
                    category, _, event = point.partition(":")
                    loader.check_tracepoint(category, event, self._tracefs)
                    b.attach_tracepoint(tp=point.encode(), fn_name=fn.encode())
                else:
                    b.attach_kprobe(event=point.encode(), fn_name=fn.encode())
        return go

    def _open_rings(self) -> None:
        """Readers of the two rings' mmap'd pages (ringbuf.py), control first."""
        from hekitrace.capture import ringbuf
        self._readers = [ringbuf.RingReader(self.bpf[name].map_fd)
                         for name in (b"hk_control", b"hk_telemetry")]

    # -- reading ----------------------------------------------------------------------
    def fds(self) -> list[int]:
        """File descriptors to poll (the two ring maps; readable when data is ready)."""
        return [r.fileno() for r in self._readers]

    def read(self, max_records: int | None = None) -> list[Event]:
        """Drain both rings (control first) and the loss counters into one event batch."""
        offset = _boot_to_epoch_ns()
        parts: list = []
        events: list[Event] = []
        for buf, spans in self._drain(max_records):
            events.extend(records.decode_batch(buf, spans, offset, self._numbers, parts,
                                               self.decode_stats))
        events.extend(self._assembler.feed(parts))
        now = time.monotonic()
        # reading the per-CPU loss map costs a syscall per key: at most every
        # LOSS_POLL_SECONDS (poll_losses() forces it)
        if now >= self._next_loss_poll:
            self._next_loss_poll = now + LOSS_POLL_SECONDS
            events.extend(self.poll_losses())
        if now >= self._next_storm_flush:
            self._next_storm_flush = now + self.settings.fault_report_interval_seconds
            events.extend(self.flush_storms(offset))
        return events

    def poll_losses(self) -> list[Event]:
        """Lost events for every drop counter that grew since the last poll."""
        return list(self._losses.update(self.bpf[b"hk_loss"], time.time_ns()))

    def flush_storms(self, epoch_offset_ns: int | None = None) -> list[Event]:
        """Report fault counts still pending on pages whose storm stopped.

        The kernel reports a storm when a fault arrives at least one interval after the
        last report; if none arrives, the count would wait forever. Entries whose last
        report is older than the interval and that hold a count are read and deleted here
        (a later fault recreates the entry and is reported at once). A fault landing
        between the read and the delete is the one count this can miss; entries idle for
        ten intervals are deleted to keep the table small. A page that owns a
        ``hk_storm_hot`` slot (bpf/fault.c) has its count there too; the slot is freed
        with its entry.
        """
        if epoch_offset_ns is None:
            epoch_offset_ns = _boot_to_epoch_ns()
        table = self.bpf[b"hk_storms"]
        hot = self.bpf[b"hk_storm_hot"]   # bpf/fault.c: counts of pages owning a slot
        now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        interval = int(self.settings.fault_report_interval_seconds * 1e9)
        out: list[Event] = []
        stale = []
        for key, st in table.items():
            count, first, slot = st.count, st.first_ns, None
            if st.hot_slot:
                h = hot[hot.Key(st.hot_slot - 1)]
                if h.key == key.value:
                    slot = st.hot_slot - 1
                    if h.count and (not count or h.first_ns < first):
                        first = h.first_ns
                    count += h.count
            idle = now_boot - st.last_report_ns
            if count and idle >= interval:
                stale.append((key, slot))
                out.append(Fault(now_boot + epoch_offset_ns, key.value >> STORM_GFN_BITS, 0,
                                 st.vcpu, st.gpa,
                                 st.error_code, st.rip, st.access, count,
                                 first + epoch_offset_ns))
            elif not count and idle >= 10 * interval:
                stale.append((key, slot))
        for key, slot in stale:
            if slot is not None:             # free the slot before its entry goes
                hot[hot.Key(slot)] = hot.Leaf()
            try:
                del table[key]
            except KeyError:
                pass
        return out

    def _drain(self, max_records: int | None) -> list[tuple[bytes, list[tuple[int, int]]]]:
        return [r.drain(max_records) for r in self._readers]

    def batches(self, timeout_seconds: float | None = None):
        """Yield event batches as the rings fill (epoll on both rings, plus one read per
        ``fault_report_interval_seconds`` so losses and stopped storms are reported even
        when nothing arrives). Stops after ``timeout_seconds`` if given."""
        import select
        poller = select.epoll()
        for fd in self.fds():
            poller.register(fd, select.EPOLLIN)
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                wait = self.settings.fault_report_interval_seconds
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                poller.poll(wait)
                batch = self.read()
                if batch:
                    yield batch
        finally:
            poller.close()

    def hook_status(self) -> dict[str, HookStatus]:
        return dict(self._status)

    def loss_totals(self) -> dict:
        return self._losses.totals()

    # -- kernel-side state --------------------------------------------------------------
    def protect_filter_update(self, tgid: int, ranges: Iterable[tuple]) -> int:
        """Replace the fault filter of VMM ``tgid`` by ``ranges`` of (gfn_start, gfn_end)
        or (gfn_start, gfn_end, access_bits): faults of those FaultAccess bits (default
        write and fetch) on pages in [gfn_start, gfn_end) reach userspace. Returns the
        number of 2 MiB buckets now installed for ``tgid`` (bpf/fault.c)."""
        table = self.bpf[b"hk_fault_filter"]
        new = filter_buckets(ranges)
        key_t, leaf_t = table.Key, table.Leaf
        for bucket in self._filter_keys.get(tgid, []):
            if bucket not in new:
                try:
                    del table[key_t(filter_key(tgid, bucket))]
                except KeyError:
                    pass
        failed = 0
        for bucket, (write, fetch) in new.items():
            leaf = leaf_t()
            for i in range(8):
                leaf.write[i] = (write >> (64 * i)) & 0xFFFFFFFFFFFFFFFF
                leaf.fetch[i] = (fetch >> (64 * i)) & 0xFFFFFFFFFFFFFFFF
            try:
                table[key_t(filter_key(tgid, bucket))] = leaf
            except Exception:  # noqa: BLE001 (bcc raises plain Exception, e.g. map full)
                failed += 1
        self._filter_keys[tgid] = list(new)
        # bpf/fault.c caches filter words per CPU: a new generation invalidates them
        gen = self.bpf[b"hk_filter_gen"]
        gen[gen.Key(0)] = gen.Leaf(gen[gen.Key(0)].value + 1)
        if failed:
            raise AttachError(f"{failed} of {len(new)} fault-filter buckets of pid {tgid} "
                              "could not be written (hk_fault_filter full? 65536 buckets of "
                              "2 MiB); faults on those pages are not reported",
                              hook="page_fault", method="filter")
        return len(new)

    def seed_memslots(self, tgid: int, slots: Iterable[tuple[int, int, int, int]]) -> int:
        """Teach the kernel-side memslot table of VMM ``tgid`` its memslots, as
        (slot, gpa, size_bytes, hva) tuples, replacing what it held.

        The page-list walk translates GPAs through memslots it learnt from the ioctl hook;
        for a VM that set them before this capture started (daemon restart) the daemon can
        replay what its journal or state knows, so list pages are read again. Slots
        beyond the table's capacity (max_memslots) are not written; returns how many were.
        """
        table = self.bpf[b"hk_memslots"]
        value = table.Leaf()
        n = 0
        cap = self.settings.max_memslots
        for slot, gpa, size, hva in slots:
            if size <= 0:
                continue
            if n >= cap:
                self._say(f"pid {tgid}: more than {cap} memslots to seed; the rest are "
                          "not known to the page-list walk")
                break
            e = value.e[n]
            e.slot, e.used, e.gpa, e.size, e.hva = int(slot), 1, int(gpa), int(size), int(hva)
            n += 1
        table[table.Key(tgid)] = value
        return n

    def forget_vm(self, tgid: int) -> list[Event]:
        """Drop the kernel-side state of a destroyed VM (memslots, filter, loss counters).

        Returns the Lost events of a final read of its loss counters (drops counted since
        the last poll): the caller must feed them to the pipeline, or they go unreported.
        """
        self.protect_filter_update(tgid, [])
        try:
            del self.bpf[b"hk_memslots"][self.bpf[b"hk_memslots"].Key(tgid)]
        except KeyError:
            pass
        return list(self._losses.forget(self.bpf[b"hk_loss"], tgid, time.time_ns()))

    def program_fd(self, name: str, prog_type: int | None = None) -> int:
        """Load (if needed) and return the fd of program ``name`` (tests, benchmarks)."""
        from bcc import BPF
        types = {"hk_hypercall_raw": BPF.RAW_TRACEPOINT, "hk_fault_raw": BPF.RAW_TRACEPOINT,
                 "hk_cr_raw": BPF.RAW_TRACEPOINT, "hk_attr_raw": BPF.RAW_TRACEPOINT,
                 "hk_attr_kprobe": BPF.KPROBE, "hk_flood": BPF.XDP,
                 "hk_ioctl_enter": BPF.TRACEPOINT, "hk_ioctl_exit": BPF.TRACEPOINT,
                 "hk_hypercall_tp": BPF.TRACEPOINT, "hk_fault_tp": BPF.TRACEPOINT,
                 "hk_cr_tp": BPF.TRACEPOINT}
        ptype = prog_type if prog_type is not None else types[name]
        return self.bpf.load_func(name.encode(), ptype).fd

    def close(self) -> None:
        """Detach everything and free the BPF object (idempotent)."""
        for r in self._readers:
            r.close()
        self._readers = []
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


#: pages per filter bucket (bpf/fault.c: gfn >> 9)
BUCKET_PAGES = 512
#: bpf/fault.c HK_STORM_GFN_BITS: storm key = tgid << 40 | gfn
STORM_GFN_BITS = 40


def filter_key(tgid: int, bucket: int) -> int:
    """bpf/fault.c filter key: tgid << 32 | bucket (gfn >> 9)."""
    return tgid << 32 | (bucket & 0xFFFFFFFF)


def filter_buckets(ranges: Iterable[tuple]) -> dict[int, tuple[int, int]]:
    """bucket (gfn >> 9) -> (write bitmap, fetch bitmap) as 512-bit ints, for ranges of
    (gfn_start, gfn_end[, FaultAccess bits]) (default write and fetch)."""
    out: dict[int, tuple[int, int]] = {}
    for r in ranges:
        start, end = int(r[0]), int(r[1])
        access = int(r[2]) if len(r) > 2 else REPORT_WRITE_FETCH
        gfn = start
        while gfn < end:
            bucket = gfn // BUCKET_PAGES
            lo = gfn - bucket * BUCKET_PAGES
            hi = min(end - bucket * BUCKET_PAGES, BUCKET_PAGES)
            bits = (1 << hi) - (1 << lo)
            w, f = out.get(bucket, (0, 0))
            if access & FaultAccess.WRITE:
                w |= bits
            if access & FaultAccess.FETCH:
                f |= bits
            out[bucket] = (w, f)
            gfn = bucket * BUCKET_PAGES + hi
    return out
