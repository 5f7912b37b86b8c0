"""The daemon under the default config, journal on, on realistic event mixes.

Used by bench_e2e.py (``--mixes``) and bench/run_all.py. The real
:class:`hekitrace.service.daemon.Daemon` is built as ``hekitrace daemon`` builds it
(commands/daemon.py ``build_daemon``): the bundled default config
(configs/hekitrace.yaml) with only its paths moved to a temporary directory (journal
directory, control socket, metrics on 127.0.0.1:0) and ``abi.mbec: true`` (a host fact:
the simulated guests run on an MBEC host), the journal ON (``JournalRecovery``: every
event journaled, fsync once a second, checkpoints), the alert sink writing JSON findings
(to /dev/null instead of stdout), no capture engine.

Why no rings: the kernel flood generator (bpf/flood.c) writes one record kind (a
non-Heki hypercall from tgid 0, an unknown VMM), and the real hooks run with
BPF_PROG_TEST_RUN stamp every record with this process's tgid (one VM); neither can carry
a mix of many known VMs. So the mixes are fed through the daemon's exact pipeline: the
events (as ``records.decode_batch`` would hand them over) go into the daemon's bounded
queue at most ``room`` at a time, exactly as ``Daemon.poll_capture`` reads the rings, and
``Ingest.process`` applies them (Pipeline.feed_many, findings to the alert sink, journal,
per-VM counters, page counts); ``Daemon.tick`` (pairing checks) runs every second of
CPU time and /metrics is rendered (``generate_latest`` on the daemon's registry) every
second of CPU time and once at the end (Prometheus scrapes every 15 s by default: this
is 15x more often). The ring transport itself is measured by bench_consumer.py and by
bench_e2e.py's ring path.

Figures are CPU time of this process (``time.process_time``, journal writes included;
the kernel's share of fsync is not).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
_CLOCK = time.process_time
T_START = 1_795_000_000_000_000_000


def default_config(tmp: str, journal: bool = True) -> Any:
    """configs/hekitrace.yaml with its paths under ``tmp`` (and the journal as asked)."""
    from hekitrace.config.settings import parse_config

    doc = yaml.safe_load((REPO / "configs" / "hekitrace.yaml").read_text())
    doc["abi"]["mbec"] = True
    doc["metrics"]["listen"] = "127.0.0.1:0"
    doc["control"]["socket"] = f"{tmp}/control.sock"
    doc["journal"]["directory"] = f"{tmp}/journal"
    doc["journal"]["enabled"] = journal
    os.makedirs(f"{tmp}/journal", exist_ok=True)
    return parse_config(yaml.safe_dump(doc), "<bench: configs/hekitrace.yaml>")


class DaemonRig:
    """A started Daemon (default config, journal on) fed events through its queue."""

    def __init__(self, journal: bool = True) -> None:
        from hekitrace.journal.recovery import JournalRecovery
        from hekitrace.pipeline import Pipeline
        from hekitrace.service.alerts import AlertSink
        from hekitrace.service.daemon import Daemon

        self.tmp = tempfile.mkdtemp(prefix="hekitrace-bench-daemon-")
        self.config = config = default_config(self.tmp, journal)
        self.devnull = open(os.devnull, "w")  # noqa: SIM115
        self.alerts = AlertSink(stdout=True, fmt=config.alerts.format, stream=self.devnull)
        recovery = JournalRecovery(config) if config.journal.enabled else None
        self.daemon = Daemon(
            config, None, load_config=lambda _p: config,
            pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied_hook_active=applied),
            recovery=recovery, alert_sink=self.alerts, log=self.devnull)
        with contextlib.redirect_stdout(self.devnull):
            self.daemon.start()
        self.scrapes = 0
        self.scrape_s = 0.0

    def scrape(self) -> None:
        from prometheus_client import generate_latest

        t0 = _CLOCK()
        body = generate_latest(self.daemon.registry)
        self.scrape_s += _CLOCK() - t0
        self.scrapes += 1
        assert b"hekitrace_events_total" in body

    def feed(self, events: list, *, timed: bool = True) -> dict:
        """Feed ``events`` as the loop would; returns CPU seconds, events, losses."""
        d = self.daemon
        ingest = d.ingest
        lost_before = self.lost()
        gc.collect()
        t0 = last_tick = _CLOCK()
        self.scrape()
        i, n = 0, len(events)
        max_depth = 0
        while i < n or ingest.depth:
            room = ingest.room
            if i < n and room > 0:
                ingest.enqueue(events[i:i + room])
                i += room
            max_depth = max(max_depth, ingest.depth)
            ingest.process()
            now = _CLOCK()
            if now - last_tick >= 1.0:
                last_tick = now
                d.tick()
                self.scrape()
        d.tick()
        self.scrape()
        cpu = _CLOCK() - t0
        return {"events": n, "cpu_s": cpu, "events_per_s": n / cpu if cpu else 0.0,
                "cpu_us_per_event": cpu / n * 1e6 if n else 0.0,
                "lost": self.lost() - lost_before, "scrapes": self.scrapes,
                "max_queue_depth": max_depth}

    def lost(self) -> int:
        return sum(self.daemon.stats.lost.values())

    def close(self) -> None:
        with contextlib.redirect_stdout(self.devnull):
            self.daemon.close()
        self.devnull.close()
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the mixes ----------------------------------------------------------------------------
def _boot_prefix_end(events: list) -> int:
    """Index after which every VM of ``events`` has sent its first protection."""
    from hekitrace.state.events import ProtectRequest, VmCreated

    vms = {e.tgid for e in events if type(e) is VmCreated}
    seen: set[int] = set()
    for i, e in enumerate(events):
        if type(e) is ProtectRequest:
            seen.add(e.tgid)
            if seen >= vms:
                return i + 1
    return len(events)


def mix_telemetry(vms: int, events: int, seed: int = 1) -> tuple[list, list]:
    """(a) (prefix, mix): known VMs, booted (the prefix, not timed), then telemetry:
    non-Heki hypercalls and CR4 writes (the stress guest's, map changes removed) and
    one write fault per three of them on pages the VM has not protected (the fault rule's
    lookup; the kernel filter would drop most of those, so this is pessimistic)."""
    from hekitrace.sim import scenarios
    from hekitrace.state.events import AttrApplied, Fault, FaultAccess, ProtectRequest

    per_vm = int(events * 3 / vms) + 4000
    stress = scenarios.simulate(["stress"], vms=vms, seed=seed, stress_events=per_vm)
    cut = _boot_prefix_end(stress) + 64
    prefix = stress[:cut]
    rest = [e for e in stress[cut:] if type(e) not in (ProtectRequest, AttrApplied)]
    rng = random.Random(seed)
    mix: list = []
    for k, e in enumerate(rest):
        mix.append(e)
        if k % 3 == 2:
            mix.append(Fault(e.time_ns, e.tgid, e.tid, 0,
                             (0x200000 + rng.randrange(4096)) << 12, 0x182, 0,
                             int(FaultAccess.WRITE), 1, 0))
        if len(mix) >= events:
            break
    return prefix, mix


def mix_protection(vms: int, events: int, seed: int = 2) -> list:
    """(b): many VMs booting and loading/unloading modules, JIT packs, text pokes (the
    stress guest whole: about 70% of its events change a map)."""
    from hekitrace.sim import scenarios

    return scenarios.simulate(["stress"], vms=vms, seed=seed,
                              stress_events=max(2000, events // vms))[:events]


def _booting(n: int, seed: int, start_ns: int, modules: int = 3) -> list[list]:
    from hekitrace.sim.guest import SimVm

    rng = random.Random(seed)
    streams = []
    for i in range(n):
        vm = SimVm(random.Random(rng.getrandbits(64)), name=f"boot-{i}",
                   start_ns=start_ns + rng.randrange(0, 1_000_000), mbec=True)
        vm.create()
        vm.boot()
        for _ in range(modules):
            vm.load_module(rng.randint(4, 40), rng.randint(1, 8), rng.randint(1, 6))
        streams.append(vm.events)
    return streams


def mix_boot_storm(vms: int = 200, seed: int = 3) -> list:
    """(c): ``vms`` Heki guests created within 1 ms of each other, each booting (its
    kernel protected, CRs pinned) and loading three modules."""
    import heapq

    return list(heapq.merge(*_booting(vms, seed, T_START), key=lambda e: e.time_ns))


def mix_hostile(booting: int = 50, flood: int = 200_000, seed: int = 4) -> tuple[list, int]:
    """(d): one booted VM floods write faults on distinct pages of its protected text and
    bogus protect requests (wx asks, misaligned entries) while ``booting`` guests boot.
    Returns (events, the hostile VM's tgid)."""
    import heapq

    from hekitrace.sim.guest import SimVm
    from hekitrace.state.events import Fault, FaultAccess, ProtectEntry, ProtectRequest

    rng = random.Random(seed)
    bad = SimVm(random.Random(seed), name="hostile", start_ns=T_START - 10**9, mbec=True)
    bad.create()
    bad.boot()
    text = bad.layout.text
    events = list(bad.events)
    t = T_START
    for k in range(flood):
        t += 200
        if k % 50 == 49:
            s = rng.randrange(*text)
            perms = 7 if k % 100 == 99 else 5
            events.append(ProtectRequest(t, bad.tgid, bad.tgid + 1, 0x9000,
                                         (ProtectEntry((s << 12) + 1, (s + 1) << 12, perms),)))
        else:
            events.append(Fault(t, bad.tgid, bad.tgid + 1 + k % 4, k % 4,
                                rng.randrange(*text) << 12, 0x182, 0xFFFFFFFFC0001000,
                                int(FaultAccess.WRITE), 1, 0))
    streams = _booting(booting, seed + 1, T_START)
    return list(heapq.merge(events, *streams, key=lambda e: e.time_ns)), bad.tgid


# -- measuring ------------------------------------------------------------------------------
def maps_complete(daemon_host: Any, events: list, skip: frozenset[int] = frozenset()) -> dict:
    """Every guest's requested and applied maps in the daemon equal those of a Host fed
    the same events alone (nothing lost, nothing left behind in a queue)."""
    from hekitrace.state.host import Host

    ref = Host(daemon_host.abi)
    for e in events:
        ref.apply(e)
    done = bad = 0
    for key, guest in ref.guests.items():
        if guest.key.tgid in skip:
            continue
        mine = daemon_host.guests.get(key)
        if mine is not None and mine.requested == guest.requested \
                and mine.applied == guest.applied:
            done += 1
        else:
            bad += 1
    return {"guests": done + bad, "complete": done, "incomplete": bad}


def baseline_floor(events: list) -> float:
    """The floor any consumer pays: a loop dispatching on ``type(event)`` into a dict
    counter; events/s in CPU time."""
    counts: dict[type, int] = {}
    t0 = _CLOCK()
    for event in events:
        k = type(event)
        counts[k] = counts.get(k, 0) + 1
    return len(events) / (_CLOCK() - t0)


def run_mix(name: str, prefix: list, events: list, rounds: int,
            check_maps: bool = False, skip: frozenset[int] = frozenset()) -> dict:
    """Best of ``rounds`` (each on a fresh daemon with an empty journal)."""
    best: dict | None = None
    for _ in range(rounds):
        rig = DaemonRig()
        try:
            if prefix:
                rig.feed(prefix)
            got = rig.feed(events)
            if check_maps:
                got["maps"] = maps_complete(rig.daemon.pipeline.host, prefix + events, skip)
                # all events arrive at once: the last guest's map is complete when the
                # backlog is applied
                got["time_to_all_maps_complete_s"] = got["cpu_s"]
            got["journal_bytes"] = sum(p.stat().st_size
                                       for p in Path(rig.tmp, "journal").rglob("*")
                                       if p.is_file())
            got["findings_emitted"] = sum(len(v) for v in rig.daemon.recent_findings.values())
        finally:
            rig.close()
        if best is None or got["events_per_s"] > best["events_per_s"]:
            best = got
    assert best is not None
    best["mix"] = name
    best["baseline_events_per_s"] = max(baseline_floor(events) for _ in range(3))
    return best


def pipeline_only(prefix: list, events: list, rounds: int) -> float:
    """Baseline for the mixes: ``Pipeline.feed_many`` alone on the same events (the
    default config, no queue, journal, alert sink or metrics); best events/s (CPU)."""
    from hekitrace.pipeline import Pipeline

    best = 0.0
    tmp = tempfile.mkdtemp(prefix="hekitrace-bench-pipe-")
    config = default_config(tmp, journal=False)
    for _ in range(rounds):
        pipeline = Pipeline(config)
        pipeline.feed_many(prefix)
        pipeline.add_observer(lambda change, findings: None)   # the daemon always has one
        gc.collect()
        t0 = _CLOCK()
        for i in range(0, len(events), 4096):
            pipeline.feed_many(events[i:i + 4096])
        best = max(best, len(events) / (_CLOCK() - t0))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return best
