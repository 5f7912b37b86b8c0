"""The text rendering of a replay document: one block per VM, then findings, losses, problems.

It reads only the ``replay -o json`` document (:func:`hekitrace.replay.to_document`), so
the text and the JSON can never disagree."""

from __future__ import annotations

import textwrap

from hekitrace.render.table import human_pages

WIDTH = 80


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _problem(problem: dict) -> str:
    where = f"byte {problem['offset']}" if problem["offset"] is not None \
        else f"line {problem['line']}"
    return f"{problem['path']}: {where}: {problem['message']}"


def render_text(doc: dict) -> str:
    """Readable tables within 80 columns: one block per VM, then findings, losses, problems."""
    lines: list[str] = []
    span = ""
    trace = doc["trace"]
    if trace["first"]:
        span = f", {trace['first'][:23]} .. {(trace['last'] or '')[11:23]}"
    lines.append(_cut(f"replayed {trace['events']} events from {len(trace['headers'])} "
                      f"file(s){span}", WIDTH))
    for snap in doc["vms"]:
        vm = snap["vm"]
        state = vm["state"] + (", DEGRADED" if vm["degraded"] else "")
        lock = "locked down" if vm["locked_down"] else "not locked down"
        lines += ["", _cut(f"VM {vm['name']}  pid {vm['pid']}  {state}  {lock}", WIDTH),
                  _cut(f"  uuid {vm['uuid'] or '-'}  memslots {vm['memslots']} "
                       f"({human_pages(vm['guest_memory_bytes'] // 4096)})", WIDTH)]
        bits = [b for cr in vm["pinned_cr"].values() for b in cr["bits"]]
        lines.append(_cut("  pinned  " + (" ".join(bits) if bits else "-"), WIDTH))
        for reason in vm["degraded_reasons"]:
            lines.append(_cut(f"  degraded: {reason}", WIDTH))
        classes = sorted(set(vm["memory"]["requested"]) | set(vm["memory"]["applied"]))
        if classes:
            lines.append(f"  {'memory class':<22}{'requested':>14}{'applied':>14}")
            for cls in classes:
                req = vm["memory"]["requested"].get(cls, {}).get("pages", 0)
                app = vm["memory"]["applied"].get(cls, {}).get("pages", 0)
                lines.append(f"  {cls:<22}{human_pages(req) if req else '-':>14}"
                             f"{human_pages(app) if app else '-':>14}")
        lines.append(_cut(f"  ranges {vm['ranges_stored']['requested']} requested, "
                          f"{vm['ranges_stored']['applied']} applied, "
                          f"{snap['differing_ranges']} differing; findings {vm['findings']}",
                          WIDTH))
    findings = doc["findings"]
    critical = sum(1 for f in findings if f["severity"] == "critical")
    lines += ["", f"FINDINGS: {len(findings)} ({critical} critical)"]
    if findings:
        lines.append(f"{'TIME':<13}{'SEVERITY':<9}{'RULE':<22}{'VM':<12}COUNT")
        for f in findings:
            vm = f["vm"] or {}
            name = vm.get("name") or f"pid-{vm.get('pid', '?')}"
            lines.append(_cut(f"{f['time'][11:23]:<13}{f['severity']:<9}"
                              f"{f['rule']:<22}{_cut(name, 11):<12}{f['count']}", WIDTH))
            lines += textwrap.wrap(f["message"], WIDTH, initial_indent="  ",
                                   subsequent_indent="    ", break_on_hyphens=False)
    if doc["lost"]:
        lines += ["", "LOST EVENTS"]
        lines += [_cut(f"  {x['stage']}/{x['reason']}: {x['count']}", WIDTH) for x in doc["lost"]]
    if doc["problems"]:
        lines += ["", f"TRACE PROBLEMS: {len(doc['problems'])}"]
        lines += [_cut(f"  {_problem(p)}", WIDTH) for p in doc["problems"]]
    return "\n".join(lines) + "\n"
