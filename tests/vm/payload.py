"""The vm tier's payload: runs inside L1 (python3 of the L1 root), checks, writes JSON.

Why one process runs every check of a boot: a boot costs about 20 s of TCG time, so all
checks share it. Each check is recorded separately as ``{name, ok, detail, data}`` in
``results.json``; the host-side pytest turns each into its own assertion. A check whose
hekitrace part has not landed in the tree fails with ``not implemented yet: <what>``: a
missing part is never a silent skip.

Order matters: hekitrace must be watching before the L2 VMM creates its memslots,
because the page-list walker translates GPAs through the memslots it saw being set.

Usage (from run.sh): ``PYTHONPATH=/mnt/src python3 payload.py --flavour 6.1 --src /mnt/src
--out DIR``: the tree's root on PYTHONPATH, so ``tests.vm.l2vmm`` and ``hekitrace`` import
from the mounted tree.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid as uuid_mod
from pathlib import Path

from tests.vm import l2vmm

HERE = Path(__file__).resolve().parent

VM_NAME = "l2-heki"
VMM_ARGV0 = "qemu-system-x86_64"

#: every check this payload reports, in order; the host-side test expects each one
CHECK_NAMES = (
    "l1.kvm_amd_loaded", "kernel.facts",
    "raw.hypercalls_seen", "raw.nested_page_faults_seen", "l2.heki_hypercalls_return_enosys",
    "raw.probe",
    "check.runs", "check.hook_hypercall", "check.hook_page_fault", "check.hook_ioctl",
    "check.hook_attr_applied",
    "config.validate",
    "record.vm_discovered_with_name", "record.memslots_seen",
    "record.cr_pin_hypercalls_decoded", "record.protect_hypercalls_decoded",
    "record.page_lists_equal_written", "record.hostile_lists_flagged",
    "record.unprotected_faults_filtered", "record.findings_expected", "record.requested_map",
    "daemon.snapshot_names_vm", "daemon.snapshot_requested_map", "daemon.fault_findings",
)
#: the checks of the Heki-v2-compatible test host's boot (``--flavour heki-6.12``)
HEKI_FLAVOUR = "heki-6.12"
PRIVATE_VM_NAME = "l2-private"
HEKI_CHECK_NAMES = (
    "l1.kvm_amd_loaded", "kernel.facts",
    "check.runs", "check.hook_hypercall", "check.hook_page_fault", "check.hook_ioctl",
    "check.hook_attr_applied", "check.attr_hook_fentry_or_kprobe", "check.no_warning_flood",
    "config.validate",
    "heki.hypercall_returns", "heki.kernel_log", "heki.pf_storm_and_cr_pin",
    "heki.vmm_attr_ioctl", "private.conversions",
    "record.attr_hook_fired", "record.attr_values_decoded", "record.applied_equals_kernel",
    "record.requested_equals_applied", "record.request_not_applied",
    "record.immutable_relaxation_refused", "record.applied_without_request", "record.no_protection_unsupported",
    "record.private_shared_map",
    "daemon.snapshot_requested_and_applied", "daemon.snapshot_image",
    "daemon.protected_write_storm", "daemon.no_protection_unsupported",
    "daemon.private_shared_map",
)
KVM_ENOSYS = 1000
#: SVM #NPF error code bits (PFERR_WRITE_MASK, PFERR_FETCH_MASK; arch/x86/include/asm/kvm_host.h)
PFERR_WRITE, PFERR_FETCH = 1 << 1, 1 << 4
ATTR_FUNCTION = "kvm_arch_post_set_memory_attributes"


class NotImplementedYet(Exception):
    """A hekitrace part the check needs is not in the tree yet."""


class Checks:
    """Collects check results; every check is isolated from the others' exceptions."""

    def __init__(self, out: Path):
        self.out = out
        self.results: list[dict] = []
        self.facts: dict = {}

    def add(self, name: str, ok: bool, detail: str = "", data=None) -> None:
        self.results.append({"name": name, "ok": bool(ok), "detail": detail, "data": data})
        print(f"CHECK {name}: {'ok' if ok else 'FAIL'} {detail[:300]}", flush=True)
        self.save()

    def run(self, name: str, fn) -> None:
        try:
            ok, detail, data = fn()
        except NotImplementedYet as e:
            ok, detail, data = False, f"not implemented yet: {e}", None
        except Exception as e:  # a check failing must not take the other checks with it
            ok, detail, data = False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None
        self.add(name, ok, detail, data)

    def fail_missing(self, names, detail: str) -> None:
        """Report every check of ``names`` not reported yet as failed with ``detail``."""
        done = {r["name"] for r in self.results}
        for n in names:
            if n not in done:
                self.add(n, False, detail)

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps({"checks": self.results, "facts": self.facts}, indent=1))
        os.rename(tmp, self.out / "results.json")


# ---------------------------------------------------------------------------------------
# helpers

def hekitrace(args: list[str], timeout: float = 180, check_missing: bool = True
              ) -> subprocess.CompletedProcess:
    """Run the ``hekitrace`` CLI as a user would; a missing part raises NotImplementedYet."""
    proc = subprocess.run(["hekitrace", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check_missing:
        _missing_part(proc.stderr, f"hekitrace {' '.join(args)}")
    return proc


def _missing_part(stderr: str, what: str) -> None:
    m = re.search(r"No module named '(hekitrace[.\w]*)'", stderr or "")
    if m:
        raise NotImplementedYet(f"{what} (module {m.group(1)} is not in the tree)")
    m = re.search(r"invalid choice: '(\w+)'", stderr or "")
    if m:
        raise NotImplementedYet(f"{what} (the CLI has no '{m.group(1)}' command yet)")


def run_vmm(out: Path, tag: str, *extra: str, hold: bool = False,
            name: str = VM_NAME) -> tuple[dict, object]:
    """Start the L2 VMM; wait for its manifest. Returns (manifest, process or None)."""
    manifest = out / f"manifest-{tag}.json"
    if manifest.exists():
        manifest.unlink()
    cmd = [sys.executable, str(HERE / "l2vmm.py"), "-name", f"guest={name}",
           "-uuid", str(uuid_mod.uuid4()), "--manifest", str(manifest), *extra]
    if hold:
        cmd.append("--hold")
    # argv[0] as QEMU's: hekitrace names VMs from QEMU-style command lines only
    # (hekitrace/capture/vmmnames.py), and this VMM takes QEMU's -name/-uuid options
    cmd[0] = VMM_ARGV0
    proc = subprocess.Popen(cmd, executable=sys.executable, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not manifest.exists():
        if proc.poll() is not None and not manifest.exists():
            raise RuntimeError(f"L2 VMM exited with {proc.returncode} before its manifest")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("L2 VMM did not finish within 120 s")
        time.sleep(0.05)
    data = json.loads(manifest.read_text())
    if not hold:
        proc.wait(timeout=30)
        return data, None
    return data, proc


def control_request(sock: Path, request: dict, timeout: float = 10) -> dict:
    """One request on the daemon's control socket (docs/internals.md protocol)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def release_vmm(proc) -> None:
    if proc is not None:
        proc.stdin.close()
        proc.wait(timeout=30)


def expected_requests(manifest: dict) -> dict[str, dict]:
    return {r["name"]: r for r in manifest["requests"]}


def written_entries(req: dict) -> list[tuple[int, int, int]]:
    """Entries as written, head page first, each page's entries in order (what a reader
    that follows next_pa from the head must return)."""
    out = []
    for page in req["pages"]:
        out.extend(tuple(e) for e in page["entries"])
    return out


# ---------------------------------------------------------------------------------------
# raw bcc probe: proves the path (tracepoints fire with the guest's values) independently
# of hekitrace

RAW_PROBE_C = r"""
struct hc_t { u64 nr, a0, a1, a2, a3; u32 pid; };
struct pf_t { u64 addr, err; u32 pid; };
BPF_PERF_OUTPUT(hcs);
BPF_PERF_OUTPUT(pfs);
TRACEPOINT_PROBE(kvm, kvm_hypercall) {
    struct hc_t e = {};
    e.nr = args->nr; e.a0 = args->a0; e.a1 = args->a1; e.a2 = args->a2; e.a3 = args->a3;
    e.pid = bpf_get_current_pid_tgid() >> 32;
    hcs.perf_submit(args, &e, sizeof(e));
    return 0;
}
TRACEPOINT_PROBE(kvm, kvm_page_fault) {
    struct pf_t e = {};
    e.addr = args->fault_address; e.err = args->error_code;
    e.pid = bpf_get_current_pid_tgid() >> 32;
    pfs.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""


def raw_probe(checks: Checks, out: Path) -> dict:
    import bcc
    t0 = time.monotonic()
    b = bcc.BPF(text=RAW_PROBE_C, cflags=["-Wno-ignored-attributes", "-Wno-unused-command-line-argument"])
    compile_s = time.monotonic() - t0
    hcs, pfs = [], []

    class Hc(ctypes.Structure):
        _fields_ = [("nr", ctypes.c_uint64), ("a0", ctypes.c_uint64), ("a1", ctypes.c_uint64),
                    ("a2", ctypes.c_uint64), ("a3", ctypes.c_uint64), ("pid", ctypes.c_uint32)]

    class Pf(ctypes.Structure):
        _fields_ = [("addr", ctypes.c_uint64), ("err", ctypes.c_uint64),
                    ("pid", ctypes.c_uint32)]

    # copy the values inside the callback: the perf ring is unmapped by cleanup()
    def on_hc(cpu, data, size):
        e = ctypes.cast(data, ctypes.POINTER(Hc)).contents
        hcs.append((e.nr, e.a0, e.a1, e.a2, e.a3, e.pid))

    def on_pf(cpu, data, size):
        e = ctypes.cast(data, ctypes.POINTER(Pf)).contents
        pfs.append((e.addr, e.err, e.pid))

    b["hcs"].open_perf_buffer(on_hc, page_cnt=64)
    b["pfs"].open_perf_buffer(on_pf, page_cnt=64)
    manifest, _ = run_vmm(out, "raw")
    for _ in range(5):
        b.perf_buffer_poll(timeout=200)
    b.cleanup()
    pid = manifest["pid"]
    seen = [e[:5] for e in hcs if e[5] == pid]
    want = [(h["nr"], h["a0"], h["a1"], h["a2"], h["a3"]) for h in manifest["hypercalls"]]
    checks.add("raw.hypercalls_seen", seen == want,
               f"kvm:kvm_hypercall from the L2 VMM (pid {pid}): {len(seen)} events, "
               f"{len(want)} issued; compile {compile_s:.1f} s"
               + ("" if seen == want else f"; seen {seen} want {want}"),
               {"seen": [list(x) for x in seen], "want": [list(x) for x in want]})
    faults = [(e[0], e[1]) for e in pfs if e[2] == pid]
    ok_w = any(a == l2vmm.TEXT[0] and err & PFERR_WRITE for a, err in faults)
    ok_f = any(a == l2vmm.RODATA[0] and err & PFERR_FETCH for a, err in faults)
    checks.add("raw.nested_page_faults_seen", ok_w and ok_f,
               f"kvm:kvm_page_fault: write at {l2vmm.TEXT[0]:#x} {'seen' if ok_w else 'MISSING'}, "
               f"fetch at {l2vmm.RODATA[0]:#x} {'seen' if ok_f else 'MISSING'}; "
               f"{len(faults)} faults in all",
               {"faults": [[hex(a), hex(e)] for a, e in faults]})
    rets = {h["what"]: h["ret32"] for h in manifest["hypercalls"]}
    enosys = (-KVM_ENOSYS) & 0xffffffff
    checks.add("l2.heki_hypercalls_return_enosys", all(v == enosys for v in rets.values()),
               "unpatched host: every Heki hypercall answers -KVM_ENOSYS (what "
               "protection_unsupported is for)", {k: hex(v) for k, v in rets.items()})
    return manifest


# ---------------------------------------------------------------------------------------
# kernel facts

def kernel_facts(checks: Checks) -> None:
    with open("/proc/kallsyms") as f:
        has_attr = any(line.split()[2] == ATTR_FUNCTION for line in f if len(line.split()) > 2)
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm_types = fcntl.ioctl(kvm, l2vmm.KVM_CHECK_EXTENSION, l2vmm.KVM_CAP_VM_TYPES)
        mem_attr = fcntl.ioctl(kvm, l2vmm.KVM_CHECK_EXTENSION, l2vmm.KVM_CAP_MEMORY_ATTRIBUTES)
    finally:
        os.close(kvm)
    sw_protected = None
    try:
        k = l2vmm.Kvm(vm_type=1)
        sw_protected = "created"
        os.close(k.vm)
        os.close(k.kvm)
    except OSError as e:
        sw_protected = f"KVM_CREATE_VM(1) failed: {os.strerror(e.errno)}"
    # on a default VM: the attributes it supports, and what setting PRIVATE does
    k = l2vmm.Kvm(vm_type=0)
    vm_mem_attr = k.check_extension(l2vmm.KVM_CAP_MEMORY_ATTRIBUTES, on_vm=True)
    k.add_slot(l2vmm.SLOT0_GPA, l2vmm.SLOT0_SIZE)
    default_vm_private = k.set_memory_attributes(0x10000, 0x1000,
                                                 l2vmm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    os.close(k.vm)
    os.close(k.kvm)
    checks.facts.update({"default_vm_memory_attributes": vm_mem_attr,
                         "default_vm_set_private": default_vm_private})
    checks.facts.update({"kernel": os.uname().release, "attr_symbol": has_attr,
                         "kvm_cap_vm_types": vm_types, "kvm_cap_memory_attributes": mem_attr,
                         "sw_protected_vm": sw_protected})
    checks.add("kernel.facts", True,
               f"{ATTR_FUNCTION} {'present' if has_attr else 'absent'}; KVM_CAP_VM_TYPES="
               f"{vm_types:#x}; KVM_CAP_MEMORY_ATTRIBUTES={mem_attr:#x}; SW_PROTECTED_VM: "
               f"{sw_protected}; default VM: KVM_CAP_MEMORY_ATTRIBUTES={vm_mem_attr:#x}, "
               f"KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) -> {default_vm_private}",
               dict(checks.facts))


# ---------------------------------------------------------------------------------------
# hekitrace check

def check_hooks(checks: Checks) -> None:
    def go():
        proc = hekitrace(["check", "-o", "json"])
        checks.facts["check_stderr"] = proc.stderr[-4000:]
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            return False, f"exit {proc.returncode}, not JSON: {proc.stdout[-500:]} " \
                          f"{proc.stderr[-1500:]}", None
        hooks = {h["key"] or h["hook"]: h for h in data["hooks"]}
        checks.facts["check"] = {k: {"attachable": h["attachable"], "method": h["method"],
                                     "reason": h["reason"]} for k, h in hooks.items()}
        return proc.returncode == 0 and data.get("ok"), \
            f"exit {proc.returncode}; " + "; ".join(
                f"{k}: {h['method'] or 'unavailable (' + str(h['reason']) + ')'}"
                for k, h in hooks.items()), checks.facts["check"]
    checks.run("check.runs", go)
    hooks = checks.facts.get("check")
    if hooks is None:
        for name in ("hypercall", "page_fault", "ioctl", "attr_applied"):
            checks.add(f"check.hook_{name}", False, "no hekitrace check report")
        return
    for name in ("hypercall", "page_fault", "ioctl"):
        h = hooks.get(name, {})
        checks.add(f"check.hook_{name}",
                   bool(h.get("attachable")) and h.get("method") in (
                       "raw_tracepoint", "tracepoint"),
                   f"{name}: {h}", h)
    h = hooks.get("attr_applied", {})
    if checks.facts.get("attr_symbol"):
        ok = bool(h.get("attachable")) and h.get("method") in ("fentry", "kprobe")
        detail = f"{ATTR_FUNCTION} exists here: must attach by fentry or kprobe; got {h}"
    else:
        ok = not h.get("attachable") and "absent" in str(h.get("reason"))
        detail = f"{ATTR_FUNCTION} absent here: must be reported unavailable; got {h}"
    checks.add("check.hook_attr_applied", ok, detail, h)


# ---------------------------------------------------------------------------------------
# hekitrace record + replay

def _wait_for(pred, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.1)


def _log_says_ready(path: Path) -> bool:
    text = path.read_text(errors="replace").lower() if path.exists() else ""
    return "recording to " in text      # hekitrace record: after capture started


def _stop(proc, sig=signal.SIGINT) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_record(out: Path, config: Path):
    """Start ``hekitrace record``; return (process, trace path) once it is recording."""
    trace = out / "l2.htrace"
    log_path = out / "record.log"
    proc = subprocess.Popen(["hekitrace", "record", "--config", str(config), "-w", str(trace)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: proc.poll() is not None or _log_says_ready(log_path), 180,
              "hekitrace record to say it is recording")
    if proc.poll() is not None:
        text = log_path.read_text()
        _missing_part(text, "hekitrace record")
        raise RuntimeError(f"hekitrace record exited {proc.returncode}: {text[-1500:]}")
    return proc, trace


def finish_record(proc, trace: Path, out: Path, config: Path) -> tuple[list[dict], dict]:
    """Stop the recording (SIGINT, as Ctrl-C), read it back, ``hekitrace replay -o json``."""
    _stop(proc)
    if not trace.exists():
        raise RuntimeError(f"hekitrace record wrote no {trace}: "
                           f"{(out / 'record.log').read_text()[-1500:]}")
    events = read_trace_dicts(trace)
    rp = hekitrace(["replay", "-o", "json", "--config", str(config), str(trace)])
    if rp.returncode not in (0, 1):
        raise RuntimeError(f"hekitrace replay exited {rp.returncode}: {rp.stderr[-1500:]}")
    (out / "replay.json").write_text(rp.stdout)
    return events, json.loads(rp.stdout)


def read_trace_dicts(trace: Path) -> list[dict]:
    """The recorded events, read back with hekitrace's own trace reader, as plain dicts
    (integers stay integers; ProtectEntry tuples stay tuples)."""
    try:
        from hekitrace.state.events import event_name
        from hekitrace.trace.file import read_events
    except ImportError as e:
        raise NotImplementedYet(f"hekitrace.trace.file reader ({e})")
    problems: list = []
    out = []
    for ev in read_events(trace, problems.append):
        d = ev._asdict()
        d["kind"] = event_name(ev)
        out.append(d)
    if problems:
        out.append({"kind": "_problems", "problems": [str(p) for p in problems]})
    return out


def replay_checks(checks: Checks, events: list[dict], replay: dict, manifest: dict,
                  prefix: str) -> None:
    pid = manifest["pid"]

    def evs(kind: str) -> list[dict]:
        return [e for e in events if e["kind"] == kind and e.get("tgid") == pid]

    def vm_found():
        created = [(e.get("name"), e.get("uuid"), e.get("source")) for e in evs("vm_created")]
        snaps = [v["vm"] for v in replay.get("vms", []) if v["vm"].get("pid") == pid]
        # one VM, one guest: the uevent and the ioctl both report the creation, and the
        # state must merge them
        ok = any(n == VM_NAME and u == manifest["uuid"] for n, u, _ in created) and \
            len(snaps) == 1 and snaps[0].get("name") == VM_NAME \
            and snaps[0].get("uuid") == manifest["uuid"]
        return ok, f"vm_created for pid {pid}: {created}; replay VMs for the pid " \
                   f"(expected exactly one, named {VM_NAME}): " \
                   f"{[(v.get('name'), v.get('uuid')) for v in snaps]}", None
    checks.run(f"{prefix}.vm_discovered_with_name", vm_found)

    def memslots():
        got = sorted((e["slot"], e["gpa"], e["size_bytes"], e["hva"]) for e in evs("memslot"))
        want = sorted((s["slot"], s["gpa"], s["size"], s["hva"]) for s in manifest["memslots"])
        return got == want, f"memslots seen {got}, set {want}", None
    checks.run(f"{prefix}.memslots_seen", memslots)

    def cr_pins():
        got = [(e["cr"], e["mask"], e["flags"]) for e in evs("cr_pin_request")]
        want = [(h["a0"], h["a1"], h["a2"]) for h in manifest["hypercalls"] if h["nr"] == 13]
        return got == want, f"cr_pin_request (cr, mask, flags) {got}, issued {want}", None
    checks.run(f"{prefix}.cr_pin_hypercalls_decoded", cr_pins)

    reqs = evs("protect_request")
    by_gpa: dict[int, list] = {}
    for e in reqs:
        by_gpa.setdefault(e["list_gpa"], []).append(e)

    def protect_decoded():
        got = [e["list_gpa"] for e in reqs]
        want = [h["a0"] for h in manifest["hypercalls"] if h["nr"] == 14]
        return got == want, f"protect_request list GPAs {[hex(g) for g in got]}, " \
                            f"issued {[hex(g) for g in want]}", None
    checks.run(f"{prefix}.protect_hypercalls_decoded", protect_decoded)

    want = expected_requests(manifest)

    def page_lists_equal():
        bad = []
        for name in ("valid", "malformed_entries", "wx"):
            req = want[name]
            got = by_gpa.get(req["head_gpa"], [])
            if not got:
                bad.append(f"{name}: no protect_request")
                continue
            g = [tuple(x) for x in got[0]["entries"]]
            w = written_entries(req)
            if g != w:
                first = next((i for i, (x, y) in enumerate(zip(g, w)) if x != y),
                             min(len(g), len(w)))
                bad.append(f"{name}: {len(g)} entries read, {len(w)} written; first "
                           f"difference at {first}: read "
                           f"{g[first] if first < len(g) else None} written "
                           f"{w[first] if first < len(w) else None}")
            elif got[0].get("pages") != len(req["pages"]) or got[0].get("flags"):
                bad.append(f"{name}: pages {got[0].get('pages')} (written "
                           f"{len(req['pages'])}), flags {got[0].get('flags')}")
        return not bad, ("page lists read from the VMM's memory equal what the guest wrote "
                         "(valid: 2 pages, 171 entries; malformed entries verbatim; W+X)"
                         if not bad else "; ".join(bad)), None
    checks.run(f"{prefix}.page_lists_equal_written", page_lists_equal)

    # ProtectFlags (hekitrace/state/events.py): TRUNCATED 1, LOOP 2, OUTSIDE_MEMSLOT 4,
    # NPAGES_OVERSIZE 8
    def hostile():
        expect = {"deep_chain": 1, "self_loop": 2, "outside_memslots": 4,
                  "oversize_npages": 8}
        bad, seen = [], {}
        for name, bit in expect.items():
            got = by_gpa.get(want[name]["head_gpa"], [])
            flags = got[0].get("flags", 0) if got else None
            seen[name] = flags
            if flags is None or not flags & bit:
                bad.append(f"{name}: flags {flags}, expected bit {bit}")
        return not bad, f"flags {seen}" + ("" if not bad else "; " + "; ".join(bad)), seen
    checks.run(f"{prefix}.hostile_lists_flagged", hostile)

    def faults():
        # docs/internals.md, Hooks: only write/fetch faults on pages the *applied* map protects
        # reach userspace, filtered in the kernel. On this unpatched host nothing is ever
        # applied, so the guest's real write and fetch faults (raw.nested_page_faults_seen
        # proves they fired) must all be dropped in the kernel: a fault event here means
        # the in-kernel filter lets unprotected pages through.
        fs = evs("fault")
        applied = [e for e in evs("attr_applied")]
        return not fs and not applied, f"{len(fs)} fault events reported for the VM " \
            f"(expected 0: no page is protected in the applied map, {len(applied)} " \
            f"attr_applied events); the guest touched {manifest['touches']}", \
            [{k: v for k, v in e.items() if k != "kind"} for e in fs[:5]]
    checks.run(f"{prefix}.unprotected_faults_filtered", faults)

    def findings():
        fl = [f for f in replay.get("findings", []) if f.get("vm", {}).get("pid") == pid]
        rules = sorted({f["rule"] for f in fl})
        need = {"wx_request", "malformed_request", "protection_unsupported"}
        return need <= set(rules), f"rules {rules}; expected at least {sorted(need)}", rules
    checks.run(f"{prefix}.findings_expected", findings)

    def requested_map():
        snaps = [v for v in replay.get("vms", []) if v["vm"].get("pid") == pid]
        if not snaps:
            return False, f"no VM with pid {pid} in the replay", None
        # (a duplicate, empty guest for the same VM is vm_discovered_with_name's concern)
        return _requested_map(max(snaps, key=lambda v: len(v.get("ranges", []))), manifest)
    checks.run(f"{prefix}.requested_map", requested_map)


# ---------------------------------------------------------------------------------------
# hekitrace daemon + snapshot over the control socket

def start_daemon(out: Path, config: Path, sock: Path, checks: Checks):
    """Start ``hekitrace daemon``; return the process once its control socket answers."""
    proc = subprocess.Popen(["hekitrace", "daemon", "--config", str(config)],
                            stdout=open(out / "daemon.log", "w"), stderr=subprocess.STDOUT,
                            text=True)
    status: dict = {}

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        if not sock.exists():
            return False
        try:
            reply = control_request(sock, {"op": "status"})
        except (OSError, ValueError):
            return False
        status.update(reply)
        return bool(reply.get("ok"))
    _wait_for(ready, 180, "the daemon's control socket to answer status")
    if proc.poll() is not None:
        text = (out / "daemon.log").read_text()
        _missing_part(text, "hekitrace daemon")
        raise RuntimeError(f"daemon exited {proc.returncode}: {text[-2000:]}")
    checks.facts["daemon_status"] = status.get("result")
    return proc


def daemon_checks(checks: Checks, out: Path, manifest: dict) -> None:
    """While the L2 VM is alive: ``hekitrace snapshot`` with no options, fault findings."""
    snap = hekitrace(["snapshot", VM_NAME, "-o", "json"])
    if snap.returncode != 0:
        raise RuntimeError(f"snapshot exited {snap.returncode}: {snap.stderr[-1500:]}; "
                           f"daemon log: {(out / 'daemon.log').read_text()[-1500:]}")
    data = json.loads(snap.stdout)
    (out / "snapshot.json").write_text(snap.stdout)
    vm = data.get("vm") or {}
    checks.add("daemon.snapshot_names_vm",
               vm.get("name") == VM_NAME and vm.get("pid") == manifest["pid"],
               f"snapshot {VM_NAME}: vm {vm.get('name')} pid {vm.get('pid')} "
               f"(VMM pid {manifest['pid']})")
    checks.run("daemon.snapshot_requested_map", lambda: _requested_map(data, manifest))
    checks.run("daemon.fault_findings", lambda: _fault_findings(checks, out, manifest))


def _fault_findings(checks: Checks, out: Path, manifest: dict) -> tuple[bool, str, object]:
    """The daemon's kernel fault filter follows the applied map when the attribute hook
    runs (6.12: nothing is ever applied here, so no fault finding), else the requested map
    (6.1: the guest's write to its requested r-x text page is a protected_write)."""
    findings = []
    for line in (out / "daemon.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                f = json.loads(line)
            except ValueError:
                continue
            if f.get("vm", {}).get("pid") == manifest["pid"]:
                findings.append(f)
    rules = sorted({f["rule"] for f in findings})
    text_writes = [f for f in findings if f["rule"] == "protected_write"
                   and f["evidence"].get("gpa", -1) >> 12 == l2vmm.TEXT[0] >> 12]
    attr_hook = (checks.facts.get("check") or {}).get("attr_applied", {}).get("attachable")
    if attr_hook is None:
        return False, "no hekitrace check report: cannot tell which map filters faults", rules
    if attr_hook:
        ok = "protected_write" not in rules and "protected_fetch" not in rules
        want = "no protected_write/fetch (the applied map filters faults and is empty)"
    else:
        ok = bool(text_writes)
        want = f"protected_write at {l2vmm.TEXT[0]:#x} (the requested map filters faults)"
    return ok, f"daemon findings for the VM: {rules}; expected {want}", \
        [f["message"] for f in findings][:10]


def _requested_map(snapshot: dict, manifest: dict) -> tuple[bool, str, object]:
    """The snapshot (views.vm_snapshot) shows the text range requested r-x immutable and
    the rodata range requested read-only immutable (EXEC may be added back without MBEC,
    docs/heki-abi.md section 5, step 4)."""
    ranges = snapshot.get("ranges")
    if ranges is None:
        raise NotImplementedYet("snapshot JSON has no 'ranges' (docs/snapshot.md)")

    def flags_at(gfn: int) -> str | None:
        for r in ranges:
            if r["gfn_start"] <= gfn < r["gfn_end"]:
                return (r.get("requested") or {}).get("flags")
        return None
    text = {flags_at(g) for g in range(l2vmm.TEXT[0] >> 12, l2vmm.TEXT[1] >> 12)}
    rodata = {flags_at(g) for g in range(l2vmm.RODATA[0] >> 12, l2vmm.RODATA[1] >> 12)}
    full0 = flags_at(l2vmm.SLOT1_GPA >> 12)
    ok = text == {"r-x I"} and rodata <= {"r-- I", "r-x I"} and len(rodata) == 1 \
        and full0 in ("r--", "r-x")
    return ok, f"requested flags: text {text}, rodata {rodata}, first page of the full " \
               f"list page {full0}; {len(ranges)} ranges in the snapshot", ranges[:12]


# ---------------------------------------------------------------------------------------

CONFIG_TEMPLATE = """\
control: {{socket: {sock}}}
metrics: {{listen: "127.0.0.1:9864"}}
journal: {{enabled: false, directory: {state}}}
hooks: {{attr_applied: optional, page_fault: optional, cr: optional}}
"""


# ---------------------------------------------------------------------------------------
# the Heki-v2-compatible test host (--flavour heki-6.12)

#: short pairing and dedup windows, so that pairing findings and the storm's summary
#: finding are out while the guests are still held
HEKI_CONFIG_TEMPLATE = CONFIG_TEMPLATE + \
    "policy: {{pairing_window_seconds: 1.0, dedup_window_seconds: 1.0}}\n"
#: the test host's attribute values (KVM_MEMORY_ATTRIBUTE_HEKI_* bits 4-7)
K_R, K_W, K_X, K_I = 0x10, 0x20, 0x40, 0x80
#: v2's log line for each accepted or refused range (tests/vm/heki-host/heki-v2-host.patch)
_HEKI_REQUEST = re.compile(r"heki: Request to protect GFNs ([0-9a-f]+)-([0-9a-f]+) with "
                           r"(immutable|mutable) permissions=([r_])([w_])([x_])")


def kernel_log() -> str:
    for cmd in (["dmesg"], ["busybox", "dmesg"]):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
    return ""


def kernel_heki_map(log: str) -> tuple[dict[int, int], list[tuple[int, int, int, bool]]]:
    """The Heki bits the host kernel applied, page by page, from its own log: each
    ``Request to protect GFNs`` line is applied unless ``Failed to set permissions``
    follows it. Returns (gfn -> value, [(start, end, value, applied)])."""
    lines = log.splitlines()
    pages: dict[int, int] = {}
    ranges = []
    for i, line in enumerate(lines):
        m = _HEKI_REQUEST.search(line)
        if not m:
            continue
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        value = (K_I if m.group(3) == "immutable" else 0) | (K_R if m.group(4) == "r" else 0) \
            | (K_W if m.group(5) == "w" else 0) | (K_X if m.group(6) == "x" else 0)
        failed = i + 1 < len(lines) and "Failed to set permissions" in " ".join(
            lines[i + 1:i + 3])
        ranges.append((start, end, value, not failed))
        if not failed:
            for g in range(start, end):
                pages[g] = value
    return pages, ranges


def map_pages(snapshot_vm: dict, side: str, mask: int = 0xF0) -> dict[int, int]:
    """gfn -> value of one map (``requested``/``applied``) of a snapshot or replay VM."""
    out = {}
    for r in snapshot_vm.get("ranges", []):
        v = (r.get(side) or {}).get("value", 0) & mask
        if v:
            for g in range(r["gfn_start"], r["gfn_end"]):
                out[g] = v
    return out


def _diff(a: dict[int, int], b: dict[int, int], names=("a", "b")) -> str:
    keys = sorted(set(a) | set(b))
    bad = [g for g in keys if a.get(g) != b.get(g)]
    if not bad:
        return ""
    return f"{len(bad)} pages differ, first {[hex(g) for g in bad[:6]]}: " \
           + ", ".join(f"{g:#x} {names[0]}={a.get(g, 0):#x} {names[1]}={b.get(g, 0):#x}"
                       for g in bad[:6])


def heki_vmm_checks(checks: Checks, mh: dict, mp: dict | None, log: str) -> None:
    from tests.vm import l2vmm as v  # noqa: PLC0415
    rets = {h["what"]: h["ret32"] for h in mh["hypercalls"]}
    want = {"cr_version": 1, "lock_cr4": 0, "lock_cr0": 0, "valid": 0,
            "relax_immutable": (-v.KVM_EPERM) & 0xffffffff,
            "oversize_npages": (-v.KVM_EINVAL) & 0xffffffff,
            "self_loop": (-v.KVM_EINVAL) & 0xffffffff}
    checks.add("heki.hypercall_returns", rets == want,
               f"returns {({k: hex(x) for k, x in rets.items()})}; expected "
               f"{({k: hex(x) for k, x in want.items()})} (v2 version 1; -EPERM on the "
               "immutable page; -KVM_EINVAL for npages > 169 and for a chain beyond the "
               "port's 64-page bound)", rets)
    need = ["heki: Request to protect GFNs", "Guest tried to change immutable permission",
            "heki: Failed to set permissions", "heki: Too many entries in list",
            "heki: Page list longer than 64 pages", "heki: Creating write #PF at",
            "heki: Blocked CR0 update", "Clearing kernel exec depends on MBEC"]
    missing = [n for n in need if n not in log]
    checks.add("heki.kernel_log", not missing,
               f"v2's log strings in dmesg; missing: {missing}",
               [line for line in log.splitlines() if "heki" in line][-20:])
    touches = {t["kind"]: t for t in mh["touches"]}
    st, dw, cr = (touches.get("write_storm", {}), touches.get("write", {}),
                  touches.get("cr0_write_without_wp", {}))
    ok = st.get("pf_injected") == v.STORM_FAULTS and st.get("unchanged") \
        and dw.get("written") and dw.get("pf_injected") == 0 and cr.get("gp_injected")
    checks.add("heki.pf_storm_and_cr_pin", bool(ok),
               f"rodata write: {st}; data write: {dw}; CR0 write without the pinned WP: "
               f"{cr} (expected {v.STORM_FAULTS} #PF injected, rodata unchanged, the data "
               "write done without #PF, #GP on the CR0 write)", touches)
    io = mh["attr_ioctls"]
    checks.add("heki.vmm_attr_ioctl", len(io) == 1 and io[0]["result"] == 0,
               f"KVM_SET_MEMORY_ATTRIBUTES with Heki bits by the VMM: {io}", io)
    if mp is None:
        checks.add("private.conversions", False, "the private-memory VMM did not run")
        return
    ok = [a["result"] for a in mp["attr_ioctls"]] == [0, 0, 0] and \
        len(mp["map_gpa_exits"]) == 1 and mp["hypercalls"][0]["ret32"] == 0
    checks.add("private.conversions", ok,
               f"KVM_X86_SW_PROTECTED_VM with guest_memfd: attribute ioctls "
               f"{mp['attr_ioctls']}; KVM_HC_MAP_GPA_RANGE exits {mp['map_gpa_exits']}; "
               f"L2 saw {mp['hypercalls']}", mp)


def expected_heki_maps(mh: dict) -> tuple[dict[int, int], dict[int, int]]:
    """(requested, applied) Heki bits as the guest asked and the host must have applied
    them (EXEC added back: no MBEC), from the manifest alone."""
    req = {}
    for r in mh["requests"]:
        if r["expect"] != "applied":
            continue
        for page in r["pages"]:
            for pa, epa, perms in page["entries"]:
                val = K_R * bool(perms & 1) | K_W * bool(perms & 2) | K_X | \
                    K_I * bool(perms & 8)
                for g in range(pa >> 12, epa >> 12):
                    req[g] = val
    app = dict(req)
    for a in mh["attr_ioctls"]:
        if a["result"] == 0:
            for g in range(a["gpa"] >> 12, (a["gpa"] + a["size"]) >> 12):
                app[g] = a["attributes"]
    return req, app


def heki_map_checks(checks: Checks, prefix: str, vm: dict, findings: list[dict],
                    mh: dict, kernel_pages: dict[int, int]) -> None:
    from tests.vm import l2vmm as v  # noqa: PLC0415
    req_want, app_want = expected_heki_maps(mh)
    requested, applied = map_pages(vm, "requested"), map_pages(vm, "applied")
    ioctl = {g for a in mh["attr_ioctls"] if a["result"] == 0
             for g in range(a["gpa"] >> 12, (a["gpa"] + a["size"]) >> 12)}
    kernel_all = dict(kernel_pages)
    kernel_all.update({g: app_want[g] for g in ioctl})

    def applied_eq_kernel():
        d = _diff(applied, kernel_all, ("hekitrace", "kernel"))
        d2 = _diff(kernel_all, app_want, ("kernel", "expected"))
        return not d and not d2, (f"applied map equals the kernel's ({len(kernel_all)} pages: "
                                  "its heki log lines plus the VMM's ioctl)" if not d else d) \
            + (f"; the kernel itself differs from the expectation: {d2}" if d2 else ""), None
    checks.run(f"{prefix}.applied_equals_kernel", applied_eq_kernel)

    def req_eq_app():
        accepted = set(req_want)
        d = _diff({g: requested.get(g, 0) for g in accepted},
                  {g: applied.get(g, 0) for g in accepted}, ("requested", "applied"))
        d2 = _diff({g: requested.get(g, 0) for g in accepted}, req_want,
                   ("requested", "written"))
        return not d and not d2, (f"requested == applied on all {len(accepted)} pages the "
                                  "host accepted" if not d else d) + (f"; {d2}" if d2 else ""), \
            None
    checks.run(f"{prefix}.requested_equals_applied", req_eq_app)

    rules = [(f["rule"], f.get("evidence", {})) for f in findings]

    # pages of the lists the host refused (-EPERM, and -KVM_EINVAL from the port's bounds,
    # which v2 and hekitrace's v2 model do not have: the model expects those applied)
    refused = {g for r in mh["requests"] if r["expect"] != "applied"
               for page in r["pages"] for pa, epa, _p in page["entries"]
               for g in range(pa >> 12, epa >> 12)}

    def not_applied():
        hits = [e for r, e in rules if r == "request_not_applied"]
        on_refused = [e for e in hits if any(e.get("gfn_start", -1) <= g < e.get("gfn_end", -1)
                                             for g in refused)]
        wrong = [e for e in hits if any(e.get("gfn_start", -1) <= g < e.get("gfn_end", -1)
                                        for g in app_want)]
        return bool(on_refused) and not wrong, \
            f"request_not_applied on refused pages: {[(e.get('gfn_start'), e.get('requested'), e.get('applied')) for e in on_refused][:4]}; " \
            f"on applied pages (must be none): {wrong[:3]}; refused pages " \
            f"{sorted(hex(g) for g in refused)}; rules seen {sorted({r for r, _ in rules})}", None
    checks.run(f"{prefix}.request_not_applied", not_applied)

    def relaxation():
        g = v.RODATA[0] >> 12
        hits = [(r, e) for r, e in rules if r in ("relax_after_lockdown", "immutable_change")
                and e.get("gfn_start", -1) <= g < e.get("gfn_end", -1)]
        return bool(hits) and all(e.get("errno") == "EPERM" for _, e in hits), \
            f"the refused relaxation of immutable gfn {g:#x} (host: -EPERM): " \
            f"{[(r, e.get('old'), e.get('new'), e.get('errno')) for r, e in hits][:3]}", None
    checks.run(f"{prefix}.immutable_relaxation_refused", relaxation)

    def without_request():
        g = v.VMM_ATTR[0] >> 12
        hits = [e for r, e in rules if r == "applied_without_request"
                and e.get("gfn_start", -1) <= g < e.get("gfn_end", -1)]
        return bool(hits), f"applied_without_request on the VMM's ioctl range at gfn " \
                           f"{g:#x}: {hits[:3]}", None
    checks.run(f"{prefix}.applied_without_request", without_request)

    checks.run(f"{prefix}.no_protection_unsupported", lambda: (
        "protection_unsupported" not in {r for r, _ in rules},
        f"rules {sorted({r for r, _ in rules})} (protection_unsupported must not fire on a "
        "host that applies)", None))


def private_map_check(checks: Checks, name: str, vm: dict | None, mp: dict | None) -> None:
    from tests.vm import l2vmm as v  # noqa: PLC0415

    def go():
        if vm is None or mp is None:
            return False, "no private VM in the output", None
        private = map_pages(vm, "applied", 0x8)
        want = {v.PRIVATE_L2 >> 12: 0x8}
        return private == want, f"private pages in the applied map {[hex(g) for g in private]}" \
                                f"; expected only {v.PRIVATE_L2:#x} (the VMM's range was made " \
                                "private then shared again)", None
    checks.run(name, go)


def heki_main(out: Path, checks: Checks, record_only: bool = False) -> int:
    """The Heki host's boot; ``record_only`` (the mutant run) skips check and daemon."""
    t0 = time.monotonic()
    mod = subprocess.run(["modprobe", "kvm_amd"], capture_output=True, text=True)
    checks.add("l1.kvm_amd_loaded", mod.returncode == 0 and os.path.exists("/dev/kvm"),
               f"modprobe kvm_amd (built in): exit {mod.returncode} {mod.stderr.strip()}")
    if not os.path.exists("/dev/kvm"):
        return 1
    kernel_facts(checks)
    if not record_only:
        heki_check_command(checks)
    heki_record_and_daemon(out, checks, record_only)
    checks.facts["payload_seconds"] = round(time.monotonic() - t0, 1)
    checks.save()
    return 0


def heki_check_command(checks: Checks) -> None:
    check_hooks(checks)
    h = (checks.facts.get("check") or {}).get("attr_applied", {})
    checks.add("check.attr_hook_fentry_or_kprobe", h.get("method") in ("fentry", "kprobe"),
               f"attribute hook method {h.get('method')} (fentry where it loads, else "
               "kprobe)", h)


def warning_flood_check(checks: Checks, out: Path) -> None:
    """bcc compiles each process's BPF object once, and the compiler's diagnostics stay a
    few lines (the kernel's IBT headers give two -Wignored-attributes under bcc's clang)."""
    texts = {"check": checks.facts.get("check_stderr", "")}
    for name in ("record", "daemon"):
        path = out / f"{name}.log"
        texts[name] = path.read_text(errors="replace") if path.exists() else ""
    seen = {}
    for name, text in texts.items():
        lines = text.splitlines()
        seen[name] = {"warnings": sum(1 for x in lines if ": warning:" in x),
                      "compiles": sum(1 for x in lines if "warnings generated" in x
                                      or "warning generated" in x)}
    ok = all(v["warnings"] <= 5 and v["compiles"] <= 1 for v in seen.values())
    checks.add("check.no_warning_flood", ok,
               f"compiler warnings and warning summaries (one per compile) per process: "
               f"{seen}", seen)


def heki_record_and_daemon(out: Path, checks: Checks, record_only: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="hekitrace-"))
    sock = Path("/run/hekitrace/control.sock")
    config = Path("/etc/hekitrace/hekitrace.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(HEKI_CONFIG_TEMPLATE.format(sock=sock, state=work / "state"))
    validate = hekitrace(["config", "validate", str(config)], check_missing=False)
    checks.add("config.validate", validate.returncode == 0,
               f"exit {validate.returncode}: {validate.stdout.strip()} "
               f"{validate.stderr.strip()}"[:1500])
    daemon = record = trace = vmm_h = vmm_p = None
    mh = mp = None
    errors = {}
    if record_only:
        errors["daemon"] = errors["check"] = "not run (--record-only)"
    else:
        try:
            daemon = start_daemon(out, config, sock, checks)
        except Exception as e:
            errors["daemon"] = f"daemon failed: {type(e).__name__}: {e}"[:3000]
    try:
        record, trace = start_record(out, config)
    except Exception as e:
        errors["record"] = f"record failed: {type(e).__name__}: {e}"[:3000]
    try:
        time.sleep(1.0)
        mh, vmm_h = run_vmm(out, "heki", "--scenario", "heki", "--touch-delay", "3",
                            hold=True)
        mp, vmm_p = run_vmm(out, "private", "--scenario", "private", "--touch-delay", "1",
                            hold=True, name=PRIVATE_VM_NAME)
        time.sleep(3.0)     # beyond the 1 s pairing window
    except Exception as e:
        errors.setdefault("daemon", f"the L2 runs failed: {e}")
        errors.setdefault("record", f"the L2 runs failed: {e}")
    log = kernel_log()
    (out / "dmesg.log").write_text(log)
    kernel_pages, _ranges = kernel_heki_map(log)
    if mh is not None:
        heki_vmm_checks(checks, mh, mp, log)
    try:
        if daemon is not None and mh is not None and "daemon" not in errors:
            heki_daemon_checks(checks, out, mh, mp, kernel_pages)
    except Exception as e:
        errors["daemon"] = f"daemon/snapshot failed: {type(e).__name__}: {e}"[:3000]
    finally:
        release_vmm(vmm_h)
        release_vmm(vmm_p)
        time.sleep(1.0)
        _stop(daemon, signal.SIGTERM)
    if record is not None and mh is None:
        _stop(record)
    elif record is not None:
        try:
            events, replay = finish_record(record, trace, out, config)
            heki_record_checks(checks, events, replay, mh, mp, kernel_pages)
        except Exception as e:
            errors["record"] = f"record/replay failed: {type(e).__name__}: {e}\n" \
                               f"{traceback.format_exc()}"[:3000]
    if not record_only:
        warning_flood_check(checks, out)
    for n in HEKI_CHECK_NAMES:
        part = n.split(".")[0]
        if part in errors:
            checks.fail_missing([n], errors[part])
    checks.fail_missing(HEKI_CHECK_NAMES, "not reached (an earlier step failed)")


def heki_record_checks(checks: Checks, events: list[dict], replay: dict, mh: dict,
                       mp: dict | None, kernel_pages: dict[int, int]) -> None:
    pid = mh["pid"]
    attr = [e for e in events if e["kind"] == "attr_applied" and e.get("tgid") == pid]
    values = sorted({e.get("attributes") for e in attr if e.get("attributes") is not None})
    checks.add("record.attr_hook_fired", bool(attr),
               f"{len(attr)} attr_applied events from kvm_arch_post_set_memory_attributes "
               f"for the Heki guest (fired inside hypercall 14 and the VMM's ioctl)",
               attr[:3] and [{k: v for k, v in e.items() if k != "kind"} for e in attr[:3]])
    flags = {}
    vms = {v["vm"].get("pid"): v for v in replay.get("vms", [])}
    vm = vms.get(pid) or {}
    for r in vm.get("ranges", []):
        a = r.get("applied") or {}
        if a.get("value"):
            flags[hex(a["value"])] = a.get("flags")
    want = {"0xd0": "r-x I", "0x50": "r-x", "0x70": "rwx"}
    ok = all(flags.get(k) == f for k, f in want.items()) and {0xD0, 0x50, 0x70} <= set(values)
    checks.add("record.attr_values_decoded", ok,
               f"hook values {[hex(x) for x in values]}; decoded applied flags {flags}; "
               f"expected {want} (abi.mbec: false, EXEC added back)", flags)
    findings = [f for f in replay.get("findings", []) if f.get("vm", {}).get("pid") == pid]
    heki_map_checks(checks, "record", vm, findings, mh, kernel_pages)
    pvm = vms.get(mp["pid"]) if mp else None
    private_map_check(checks, "record.private_shared_map", pvm, mp)


def heki_daemon_checks(checks: Checks, out: Path, mh: dict, mp: dict | None,
                       kernel_pages: dict[int, int]) -> None:
    from tests.vm import l2vmm as v  # noqa: PLC0415
    snap = hekitrace(["snapshot", VM_NAME, "-o", "json", "--image",
                      str(out / "l2-heki.svg")])
    if snap.returncode != 0:
        raise RuntimeError(f"snapshot exited {snap.returncode}: {snap.stderr[-1500:]}; "
                           f"daemon log: {(out / 'daemon.log').read_text()[-1500:]}")
    (out / "snapshot-heki.json").write_text(snap.stdout)
    data = json.loads(snap.stdout)
    req_want, app_want = expected_heki_maps(mh)
    requested, applied = map_pages(data, "requested"), map_pages(data, "applied")
    kernel_all = dict(kernel_pages)
    kernel_all.update({g: app_want[g] for g in app_want if g not in req_want})
    d1 = _diff(applied, kernel_all, ("snapshot applied", "kernel"))
    # requested as written on the accepted pages; elsewhere only pages of refused lists
    # (hekitrace's v2 model expects the port's bound-refused lists applied)
    refused = {g for r in mh["requests"] if r["expect"] != "applied"
               for page in r["pages"] for pa, epa, _p in page["entries"]
               for g in range(pa >> 12, epa >> 12)}
    d2 = _diff({g: requested.get(g, 0) for g in req_want}, req_want,
               ("snapshot requested", "written"))
    extra = sorted(hex(g) for g in requested if g not in req_want and g not in refused)
    if extra:
        d2 = f"{d2}; requested outside the written and refused pages: {extra[:6]}"
    checks.add("daemon.snapshot_requested_and_applied", not d1 and not d2,
               f"snapshot {VM_NAME}: {len(data.get('ranges', []))} ranges, requested and "
               f"applied side by side; applied vs kernel: {d1 or 'equal'}; requested vs "
               f"written: {d2 or 'equal'}", data.get("ranges", [])[:8])
    svg = out / "l2-heki.svg"
    text = svg.read_text(errors="replace") if svg.exists() else ""
    checks.add("daemon.snapshot_image", text.lstrip().startswith(("<svg", "<?xml")),
               f"snapshot --image wrote {svg.stat().st_size if svg.exists() else 0} bytes")
    findings = []
    for line in (out / "daemon.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                f = json.loads(line)
            except ValueError:
                continue
            if f.get("vm", {}).get("pid") == mh["pid"]:
                findings.append(f)
    g = v.RODATA[0] >> 12
    writes = [f for f in findings if f["rule"] == "protected_write"
              and f.get("evidence", {}).get("gpa", -1) >> 12 == g]
    counted = sum(int(f.get("count") or 1) for f in writes)
    checks.add("daemon.protected_write_storm", bool(writes) and counted >= 2,
               f"protected_write at {v.RODATA[0]:#x}: {len(writes)} findings counting "
               f"{counted} faults (the guest took {v.STORM_FAULTS} injected #PFs); "
               f"messages {[f['message'] for f in writes][:3]}",
               [f.get("evidence") for f in writes][:5])
    rules = sorted({f["rule"] for f in findings})
    checks.add("daemon.no_protection_unsupported", "protection_unsupported" not in rules,
               f"daemon rules for the VM: {rules}")
    if mp is not None:
        ps = hekitrace(["snapshot", PRIVATE_VM_NAME, "-o", "json"])
        pdata = json.loads(ps.stdout) if ps.returncode == 0 else None
        (out / "snapshot-private.json").write_text(ps.stdout)
        private_map_check(checks, "daemon.private_shared_map", pdata, mp)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--record-only", action="store_true",
                    help="only the raw probe and record/replay (the mutation run)")
    args = ap.parse_args()
    out = Path(args.out)
    checks = Checks(out)
    checks.facts["flavour"] = args.flavour
    if args.flavour == HEKI_FLAVOUR:
        return heki_main(out, checks, args.record_only)
    t0 = time.monotonic()
    mod = subprocess.run(["modprobe", "kvm_amd"], capture_output=True, text=True)
    checks.add("l1.kvm_amd_loaded", mod.returncode == 0 and os.path.exists("/dev/kvm"),
               f"modprobe kvm_amd: exit {mod.returncode} {mod.stderr.strip()}")
    if not os.path.exists("/dev/kvm"):
        return 1
    kernel_facts(checks)
    checks.run("raw.probe", lambda: (bool(raw_probe(checks, out)), "raw bcc probe ran", None))
    if not args.record_only:
        check_hooks(checks)

    # L1's root disk is a throwaway snapshot: the config goes where users put it, so
    # `hekitrace snapshot` finds the daemon's socket with no options at all
    work = Path(tempfile.mkdtemp(prefix="hekitrace-"))
    sock = Path("/run/hekitrace/control.sock")
    config = Path("/etc/hekitrace/hekitrace.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG_TEMPLATE.format(sock=sock, state=work / "state"))
    validate = hekitrace(["config", "validate", str(config)], check_missing=False)
    checks.add("config.validate", validate.returncode == 0,
               f"exit {validate.returncode}: {validate.stdout.strip()} {validate.stderr.strip()}"
               [:1500])

    # record and daemon watch the same guest run, so their (slow, TCG) BPF compiles and
    # the guest run happen once
    record_names = [n for n in CHECK_NAMES if n.startswith("record.")]
    daemon_names = [n for n in CHECK_NAMES if n.startswith("daemon.")]
    record_error = daemon_error = None
    daemon = record = trace = vmm = None
    if not args.record_only:
        try:
            daemon = start_daemon(out, config, sock, checks)
        except NotImplementedYet as e:
            daemon_error = f"not implemented yet: {e}"
        except Exception as e:
            daemon_error = f"daemon failed: {type(e).__name__}: {e}"[:3000]
    try:
        record, trace = start_record(out, config)
    except NotImplementedYet as e:
        record_error = f"not implemented yet: {e}"
    except Exception as e:
        record_error = f"record failed: {type(e).__name__}: {e}"[:3000]
    manifest = None
    try:
        time.sleep(1.0)
        manifest, vmm = run_vmm(out, "watched", "--touch-delay", "3", hold=True)
        time.sleep(3.0)
    except Exception as e:
        record_error = record_error or f"the watched L2 run failed: {e}"
        daemon_error = daemon_error or f"the watched L2 run failed: {e}"
    try:
        if daemon is not None and manifest is not None:
            try:
                daemon_checks(checks, out, manifest)
            except NotImplementedYet as e:
                daemon_error = f"not implemented yet: {e}"
            except Exception as e:
                daemon_error = f"daemon/snapshot failed: {type(e).__name__}: {e}"[:3000]
    finally:
        release_vmm(vmm)
        time.sleep(1.0)
        _stop(daemon, signal.SIGTERM)
    if record is not None and manifest is None:
        _stop(record)
    elif record is not None:
        try:
            events, replay = finish_record(record, trace, out, config)
            replay_checks(checks, events, replay, manifest, "record")
        except NotImplementedYet as e:
            record_error = f"not implemented yet: {e}"
        except Exception as e:
            record_error = f"record/replay failed: {type(e).__name__}: {e}"[:3000]
    if record_error:
        checks.fail_missing(record_names, record_error)
    if daemon_error and not args.record_only:
        checks.fail_missing(daemon_names, daemon_error)
    checks.facts["payload_seconds"] = round(time.monotonic() - t0, 1)
    checks.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
