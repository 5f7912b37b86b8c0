"""A simulated Heki v2 guest and host: the events a real Heki host would show hekitrace.

Real Heki hosts are rare (the series was never merged), so the examples, the policy's
regression suite and the benchmarks run on this model instead. It is faithful where it
matters to hekitrace (docs/heki-abi.md sections 4-7 and 12):

* the guest's memory is a real kernel's: section boundaries from the System.map of a
  Debian linux-image package (hekitrace/data/kernel-layout-*.json, made by
  scripts/make_kernel_layout.py), converted to physical addresses;
* page lists are built as the v2 guest's ``heki_add_pa()`` builds them: adjacent pages
  with equal permissions merge into one range, a list page holds 169 entries, a full
  page is followed by a new page that becomes the head, and the hypercall gets the
  newest page's GPA; ``ProtectRequest.entries`` are in the order the host reads them
  (head page first);
* the modelled host applies entries in reverse order, checks alignment, permission bits
  and ``end > start`` (-EINVAL) and immutability (-EPERM, the range applies nothing),
  stops at the first error, skips ranges that already match, re-adds EXEC without MBEC,
  and reports each applied range once per memslot it touches (``AttrApplied``), as
  ``kvm_handle_gfn_range`` calls ``kvm_arch_post_set_memory_attributes``.

The memory model is in hekitrace.sim.page_lists, the VM and host model in hekitrace.sim.guest;
this module holds the scenarios (:data:`SCENARIOS`, each returning a list of events in
time order) and :func:`simulate`. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from hekitrace.sim.guest import DEFAULT_START_NS, X86_CR4_SMEP, SimVm
from hekitrace.state.events import PAGE_SIZE, Event, FaultAccess, ProtectFlags

# -- scenarios ------------------------------------------------------------------------------

def _booted(rng: random.Random, name: str, start_ns: int, modules: int = 3, **kw) -> SimVm:
    vm = SimVm(rng, name=name, start_ns=start_ns, **kw)
    vm.create()
    vm.boot()
    vm.modules = [vm.load_module(rng.randint(4, 40), rng.randint(1, 8), rng.randint(1, 6))
                  for _ in range(modules)]
    return vm


def _clean_boot(vm_rng, name, start):
    return [_booted(vm_rng, name, start)]


def _module_load_unload(rng, name, start):
    vm = _booted(rng, name, start)
    # a big module (a GPU driver: 1.8 MiB of text in scattered pages) needs a chained list
    big = vm.load_module(450, 30, 16)
    vm.unload_module(vm.modules.pop(0))
    vm.unload_module(big)
    return [vm]


def _bpf_jit(rng, name, start):
    vm = _booted(rng, name, start)
    packs = [vm.bpf_jit(rng.randint(1, 2)) for _ in range(3)]
    vm.bpf_free(packs[0])
    return [vm]


def _text_poke(rng, name, start):
    vm = _booted(rng, name, start)
    for _ in range(3):
        vm.text_poke(rng.choice(vm.modules[0]["text"]))
    return [vm]


def _attack_write_text(rng, name, start):
    vm = _booted(rng, name, start)
    text = vm.layout.text
    gfn = rng.randrange(*text)
    rip = 0xFFFFFFFFC0000000 + rng.randrange(1 << 20)  # code in a module writes core text
    vm.fault(gfn, FaultAccess.WRITE, rip, 4000)
    return [vm]


def _attack_exec_data(rng, name, start):
    vm = _booted(rng, name, start)
    gfn = rng.randrange(*vm.layout.data)
    rip = 0xFFFFFFFF80000000 + gfn * PAGE_SIZE  # executing the data page itself
    vm.fault(gfn, FaultAccess.FETCH, rip, 1200)
    return [vm]


def _attack_clear_smep(rng, name, start):
    vm = _booted(rng, name, start)
    vm.cr4_write(vm.cr4 & ~X86_CR4_SMEP)
    return [vm]


def _attack_reprotect_immutable(rng, name, start):
    vm = _booted(rng, name, start)
    lo, hi = vm.layout.rodata
    s = rng.randrange(lo, hi - 4)
    vm.protect([(s * PAGE_SIZE, (s + 4) * PAGE_SIZE, vm.perm["r"] | vm.perm["w"])])
    return [vm]


def _attack_wx_request(rng, name, start):
    vm = _booted(rng, name, start)
    pages = vm.alloc_pages(2)
    p = vm.perm
    vm.protect(vm.runs(pages, p["r"] | p["w"] | p["x"]))
    return [vm]


def _attack_malformed_lists(rng, name, start):
    vm = _booted(rng, name, start)
    p = vm.perm
    g = vm.alloc_pages(1)[0] * PAGE_SIZE
    rw = p["r"] | p["w"]
    vm.protect([(g + 0x123, g + PAGE_SIZE, rw)])                 # misaligned
    vm.protect([(g + PAGE_SIZE, g, rw)])                          # end before start
    vm.protect([(g, g + PAGE_SIZE, rw | 0x30)])                   # unknown bits
    # npages = 500 declared on one page: the walker cut it at 169 (entries restate RW)
    pages = vm.alloc_pages(169)
    vm.protect(vm.runs(pages[::2], rw), flags=ProtectFlags.NPAGES_OVERSIZE, declared=500)
    # a list page whose next_pa points back at itself
    head = next(vm._list_pool)
    vm.protect([(g, g + PAGE_SIZE, rw)], flags=ProtectFlags.LOOP, list_gpa=head)
    return [vm]


def _confidential_vm(rng, name, start):
    vm = SimVm(rng, name=name, start_ns=start, confidential=True)
    vm.create()
    vm.now += 1_500_000_000
    # swiotlb bounce buffers and GHCB pages become shared, some return to private
    for _ in range(6):
        gpa = rng.randrange(0x100000, 0xB0000000, 1 << 21)
        pages = rng.choice((1, 16, 512))
        vm.map_gpa_range(gpa, pages, private=False)
        if rng.random() < 0.4:
            vm.map_gpa_range(gpa, pages, private=True)
    return [vm]


def _multi_vm(rng, name, start):
    vms = _clean_boot(rng, f"{name}-a", start)
    vms += _module_load_unload(rng, f"{name}-b", start + 300_000_000)
    vms += _bpf_jit(rng, f"{name}-c", start + 700_000_000)
    return vms


def _stress(rng, name, start, events: int = 200_000):
    """A busy guest for benchmarks: module and BPF churn, text pokes, IPIs, CR4 writes."""
    vm = _booted(rng, name, start, modules=4)
    packs: list[list[int]] = []
    while len(vm.events) < events:
        roll = rng.random()
        if roll < 0.55:
            vm.other_hypercall()
        elif roll < 0.75:
            vm.cr4_write()
        elif roll < 0.85:
            packs.append(vm.bpf_jit(1))
            if len(packs) > 8:
                vm.bpf_free(packs.pop(0))
        elif roll < 0.95:
            vm.text_poke(rng.choice(vm.modules[-1]["text"]))
        else:
            vm.modules.append(vm.load_module(rng.randint(4, 30), 2, 2))
            if len(vm.modules) > 6:
                vm.unload_module(vm.modules.pop(1))
    return [vm]


ScenarioFn = Callable[[random.Random, str, int], list[SimVm]]

#: scenario name -> (function, VM name, expected finding rule ids with the default policy)
SCENARIOS: dict[str, tuple[ScenarioFn, str, frozenset[str]]] = {
    "clean-boot": (_clean_boot, "web1", frozenset()),
    "module-load-unload": (_module_load_unload, "build1", frozenset()),
    "bpf-jit": (_bpf_jit, "bpf1", frozenset()),
    "text-poke": (_text_poke, "trace1", frozenset()),
    "attack-write-text": (_attack_write_text, "victim-wt", frozenset({"protected_write"})),
    "attack-exec-data": (_attack_exec_data, "victim-xd", frozenset({"protected_fetch"})),
    "attack-clear-smep": (_attack_clear_smep, "victim-cr", frozenset({"cr_pin_violation"})),
    # the policy names a relaxing request on locked-down memory relax_after_lockdown, its
    # more specific form of immutable_change
    "attack-reprotect-immutable": (_attack_reprotect_immutable, "victim-ro",
                                   frozenset({"relax_after_lockdown"})),
    "attack-wx-request": (_attack_wx_request, "victim-wx", frozenset({"wx_request"})),
    # an oversize npages leaves the host's outcome unknown: the VM is honestly degraded
    "attack-malformed-lists": (_attack_malformed_lists, "victim-ml",
                               frozenset({"malformed_request", "map_degraded"})),
    "confidential-vm": (_confidential_vm, "cvm1", frozenset()),
    "multi-vm": (_multi_vm, "fleet", frozenset()),
    "stress": (_stress, "busy", frozenset()),
}
ATTACKS = tuple(name for name in SCENARIOS if name.startswith("attack-"))
#: names accepted by ``simulate --scenario`` (``all-attacks`` expands to ATTACKS)
SCENARIO_NAMES = tuple(SCENARIOS) + ("all-attacks",)


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        out.extend(ATTACKS if name == "all-attacks" else (name,))
    return out


def simulate(names: list[str], *, vms: int = 1, seed: int = 0,
             start_ns: int = DEFAULT_START_NS, stress_events: int = 200_000) -> list[Event]:
    """Events of every scenario in ``names`` (each on ``vms`` VMs), merged in time order.

    Unknown names raise KeyError (the CLI checks them first). VMs start 50-500 ms apart
    so their events interleave as on a busy host.
    """
    rng = random.Random(seed)
    streams: list[list[Event]] = []
    offset = 0
    for name in expand(names):
        fn, vm_name, _ = SCENARIOS[name]
        for i in range(vms):
            label = vm_name if vms == 1 else f"{vm_name}-{i + 1}"
            vm_rng = random.Random(rng.getrandbits(64))
            if fn is _stress:
                made = _stress(vm_rng, label, start_ns + offset, stress_events)
            else:
                made = fn(vm_rng, label, start_ns + offset)
            streams.extend(vm.events for vm in made)
            offset += rng.randrange(50_000_000, 500_000_000)
    return list(heapq.merge(*streams, key=lambda ev: ev.time_ns))


def expected_findings(names: list[str]) -> frozenset[str]:
    """Rule ids the default policy should report for these scenarios, no more."""
    out: set[str] = set()
    for name in expand(names):
        out |= SCENARIOS[name][2]
    return frozenset(out)
