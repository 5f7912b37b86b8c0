"""A fleet: one real Prometheus scraping two real daemons on this machine (their own
ports, control sockets and journal directories), and the shipped Grafana dashboard's
queries answered for each of them.

Both daemons watch the same host, so both see this process's KVM VM; they are told apart
by Prometheus' ``instance`` label, and their pictures really differ: daemon A saw the VM
created, daemon B found it running at start-up and marks it degraded. A guest protection
request (kernel text r-x immutable, a W+X range) and a CR4 pin go through each daemon's
own hypercall program, so lockdown, pages, pinned bits and a wx_request finding exist on
both. Then every panel query of the dashboard, with ``$instance`` and ``$vm`` set as the
dashboard's own variable queries offer them, returns series for that instance only, and
with both set to All returns both instances' series apart.
"""

from __future__ import annotations

import os

import pytest

from hekitrace.capture.testrun import run_raw_tracepoint
from hekitrace.config.abi import DEFAULT_PROFILE
from tests.e2e.daemon_proc import metric_value
from tests.e2e.journal_helpers import hypercall_prog_fd, journal_daemon
from tests.e2e.prometheus_proc import (
    PrometheusProcess,
    dashboard_targets,
    dashboard_variable,
    substitute,
    wait_until,
)
from tests.vmm import Vmm

pytestmark = pytest.mark.e2e

#: guest permission bits (Heki v2 MEM_ATTR_*): READ 1, WRITE 2, EXEC 4, IMMUTABLE 8
#: the guest memory both daemons saw added (B started after the first memslot, and a
#: daemon only translates guest addresses in memslots it saw or seeded from its journal)
SLOT_GPA, SLOT_BYTES = 64 << 20, 64 << 20
LIST_PAGE = SLOT_GPA + 0x100000
TEXT = (SLOT_GPA + 0x1000000, SLOT_GPA + 0x1800000, 1 | 4 | 8)   # 8 MiB text, r-x immutable
WX = (SLOT_GPA + 0x2000000, SLOT_GPA + 0x2010000, 1 | 2 | 4)     # 64 KiB writable, executable
CR4_SMEP_SMAP = (1 << 20) | (1 << 21)
#: panels that may be empty, and when: the applied map needs the attr_applied hook
APPLIED_PANEL = "Protected memory by class (applied)"


def drive_guest(vm: Vmm, prog_fd: int) -> None:
    """One PROTECT_MEMORY and one LOCK_CR_UPDATE through a daemon's hypercall program."""
    head = vm.write_heki_list([LIST_PAGE], [TEXT, WX])
    run_raw_tracepoint(prog_fd, [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])
    run_raw_tracepoint(prog_fd, [DEFAULT_PROFILE.lock_cr_update, 4, CR4_SMEP_SMAP, 0, 0])


def test_one_prometheus_two_daemons_and_the_dashboard_drills_down(tmp_path):
    me = os.getpid()
    vm_name = f"pid-{me}"
    daemons = []
    fds: list[int] = []
    prom = None
    try:
        first = journal_daemon()
        daemons.append(first.start())
        with Vmm() as vm:
            vm.add_memslot(0x0, 64 << 20)
            wait_until("the VM in daemon A", lambda: f'vm="{vm_name}"' in first.metrics())
            second = journal_daemon()
            daemons.append(second.start())
            assert len({d.port for d in daemons}) == 2
            assert len({d.socket_path for d in daemons}) == 2
            assert len({d.state_dir for d in daemons}) == 2
            vm.add_memslot(SLOT_GPA, SLOT_BYTES)
            for daemon in daemons:
                fds.append(hypercall_prog_fd(daemon))
                drive_guest(vm, fds[-1])
            for daemon in daemons:
                wait_until("the wx_request finding", lambda d=daemon: metric_value(
                    d.metrics(), f'hekitrace_findings_total{{rule="wx_request",'
                                 f'severity="critical",vm="{vm_name}"}}'))
            instances = {f"127.0.0.1:{d.port}": d for d in daemons}
            a, b = instances
            prom = PrometheusProcess(tmp_path, f"""
  - job_name: hekitrace
    static_configs: [{{targets: {sorted(instances)}}}]
""".replace("'", '"'))

            # the dashboard's Host variable offers both daemons, its VM variable the VM
            # on each of them (with any other VM running on this shared machine)
            wait_until("both daemons in the Host variable", lambda: set(
                prom.label_values(dashboard_variable("instance"))) == set(instances))
            vm_query = dashboard_variable("vm")
            for instance in instances:
                assert vm_name in prom.label_values(substitute(vm_query, instance, None))

            # one VM, two pictures: B found it running and marks it degraded, A did not
            degraded = wait_until("the VM's degraded flag from both", lambda: {
                r["metric"]["instance"]: r["value"][1]
                for r in prom.query(f'hekitrace_vm_degraded{{vm="{vm_name}"}}')} or None)
            assert degraded == {a: "0", b: "1"}
            info = prom.query(f'hekitrace_vm_info{{vm="{vm_name}"}}')
            assert sorted(r["metric"]["instance"] for r in info) == sorted(instances)
            assert {r["metric"]["pid"] for r in info} == {str(me)}

            applied_hook = {r["metric"]["instance"]: r["value"][1] == "1" for r in prom.query(
                'hekitrace_hook_attached{hook="attr_applied"}')}
            assert set(applied_hook) == set(instances)
            for instance in instances:
                check_every_panel(prom, instance, vm_name, applied_hook[instance])
            check_all_keeps_instances_apart(prom, set(instances), vm_name)
    finally:
        for fd in fds:
            os.close(fd)
        if prom is not None:
            prom.close()
        for daemon in daemons:
            daemon.close()


def check_every_panel(prom: PrometheusProcess, instance: str, vm_name: str,
                      applied_hook: bool) -> None:
    """Every panel query, with the Host and VM variables set to ``instance`` and
    ``vm_name``, returns data, and only that instance's where it keeps the label."""
    for title, expr in dashboard_targets():
        promql = substitute(expr, instance, vm_name)
        if title.startswith(APPLIED_PANEL) and not applied_hook:
            # honest emptiness: nothing applied is observed without the hook
            assert prom.query(promql) == [], (title, promql)
            continue
        rows = wait_until(f"{title} for {instance}: {promql}",
                          lambda q=promql: prom.query(q), timeout=60)
        seen = {r["metric"].get("instance") for r in rows} - {None}
        if "$instance" in expr:
            assert seen <= {instance}, (title, seen)
        if "$vm" in expr:
            assert {r["metric"].get("vm") for r in rows} - {None} <= {vm_name}, title


def check_all_keeps_instances_apart(prom: PrometheusProcess, instances: set[str],
                                    vm_name: str) -> None:
    """With Host and VM set to All, each VM panel shows our VM's series from each daemon
    (other VMs of this shared machine may show too)."""
    for title, expr in dashboard_targets():
        if "$vm" not in expr or title.startswith(APPLIED_PANEL):
            continue
        rows = [r for r in prom.query(substitute(expr, None, None))
                if r["metric"]["vm"] == vm_name]
        assert {r["metric"]["instance"] for r in rows} == instances, title
