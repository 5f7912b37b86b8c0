"""The text of ``hekitrace status``: the daemon's health at a glance, within 80 columns.

It reads only the ``status`` document the daemon answers on its control socket, so the
table and ``-o json`` can never disagree. Every hook or rule that is not active says why:
an operator reading "inactive" with no reason has to go and find it in the logs.
"""

from __future__ import annotations

from hekitrace.policy.findings import format_time
from hekitrace.render.table import WIDTH, Column, Table, cut, human_duration


def _events(status: dict) -> list[str]:
    totals = status.get("events_total") or {}
    lost = status.get("events_lost_total") or []
    out = [cut(f"events   {sum(totals.values())} received, "
               f"{sum(x['count'] for x in lost)} lost; queue "
               f"{status.get('queue_depth_events', 0)}/{status.get('queue_capacity_events', 0)}",
               WIDTH)]
    if totals:
        out.append(cut("  " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if v),
                       WIDTH))
    for x in lost:
        out.append(cut(f"  LOST {x['count']} at {x['stage']}: {x['reason']}", WIDTH))
    last = status.get("last_event_time_ns")
    if last:
        out.append(f"  last event {format_time(last)}")
    return out


def _hooks(status: dict) -> list[str]:
    table = Table([Column("hook", 14), Column("attached", 8), Column("method", 15),
                   Column("required", 8), Column("why not", 25)], indent=2)
    out = ["", "HOOKS", table.header().rstrip()]
    for h in status.get("hooks", []):
        reason = "" if h.get("attached") else (h.get("reason") or "no reason given")
        out.append(cut(table.line([h["hook"], "yes" if h.get("attached") else "NO",
                                   h.get("method") or "-",
                                   "required" if h.get("required") else "optional",
                                   reason]).rstrip(), WIDTH))
    return out


def _rules(status: dict) -> list[str]:
    policy = status.get("policy")
    if not policy:
        return []
    out = ["", cut(f"RULES (pairing of requested and applied: {policy.get('pairing', '?')})",
                   WIDTH)]
    for rule, state in sorted(policy.get("rules", {}).items()):
        out.append(cut(f"  {rule:<26}{state}", WIDTH))
    return out


def _journal(status: dict) -> list[str]:
    journal = status.get("journal")
    if journal is None:
        return ["", "journal  off (journal.enabled is false in the config)"]
    parts = [f"{k} {v}" for k, v in journal.items() if not isinstance(v, (dict, list))]
    return ["", cut("journal  " + ", ".join(parts), WIDTH)]


def render_status(status: dict) -> str:
    """The ``hekitrace status`` table."""
    ready = "READY" if status.get("ready") else "NOT READY"
    out = [cut(f"hekitrace {status.get('version', '?')}  pid {status.get('pid', '?')}  up "
               f"{human_duration(float(status.get('uptime_seconds') or 0))}  {ready}", WIDTH)]
    for reason in status.get("not_ready_reasons", []):
        out.append(cut(f"  not ready: {reason}", WIDTH))
    config = status.get("config") or {}
    digest = str(config.get("sha256") or "-")[:12]
    reload = config.get("reload_success")
    reload_text = "" if reload is None else ("; last reload ok" if reload
                                             else "; LAST RELOAD FAILED (old config kept)")
    out.append(cut(f"config   {config.get('path') or '(built-in defaults)'}  sha256 {digest}"
                   f"{reload_text}", WIDTH))
    out.append(cut(f"vms      {status.get('vms', 0)} running", WIDTH))
    out += _events(status)
    problems = [f"{name} {status[name]}" for name in
                ("internal_errors", "filter_errors") if status.get(name)]
    if problems:
        out.append(cut("PROBLEMS " + ", ".join(problems), WIDTH))
    out += _hooks(status) + _rules(status) + _journal(status)
    return "\n".join(out) + "\n"
