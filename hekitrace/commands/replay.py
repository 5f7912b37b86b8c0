"""``hekitrace replay``: run trace files through the daemon's state and rules, offline.

The events go through :class:`hekitrace.pipeline.Pipeline`, the same object the daemon
feeds, with the policy's timers driven by event time; so a replay reports what the daemon
would have reported live, at the times it would have. Trace problems (a corrupt block, a
bad line) never stop the replay: they are listed and change the exit status.

Exit status: 1 when any finding of severity ``critical`` was produced (it takes
precedence: it is the answer scripts wait for), else 4 when a trace had problems, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterable
from typing import Any

from hekitrace import config as config_mod
from hekitrace import views
from hekitrace.errors import UsageError
from hekitrace.journal import expand_paths
from hekitrace.pipeline import Pipeline
from hekitrace.policy import Finding, format_time
from hekitrace.render.table import human_pages
from hekitrace.trace import TraceHeader, TraceProblem, TraceReader, open_trace
from hekitrace.tracejson import parse_time

EXIT_CRITICAL = 1
EXIT_PROBLEMS = 4
BATCH = 4096
WIDTH = 80

EPILOG = """examples:
  hekitrace replay examples/attack.jsonl
  hekitrace replay -o json examples/multi-vm.htrace | jq '.findings[].rule'
  hekitrace replay --until +2.5 examples/clean-guest.htrace
  hekitrace replay --metrics-port 9865 examples/attack.jsonl   # then curl :9865/metrics
  hekitrace replay --metrics-file - examples/attack.jsonl      # summary, then /metrics text

exit status: 1 a critical finding (wins), 4 the trace had problems, 0 otherwise;
2 bad arguments, 3 bad config, 4 also when a file is not a trace at all.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "replay", help="replay trace files through the daemon's state and rules",
        description="Feed recorded or simulated traces (binary or JSON Lines, detected "
                    "automatically) through the daemon's state and rules; print each VM's "
                    "map summary and every finding.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="trace files, replayed one after the other in this order")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="output format (default: text)")
    parser.add_argument("--until", metavar="TIME",
                        help="stop before the first event after TIME: RFC 3339 "
                             "(2026-11-25T15:00:03Z) or +SECONDS after the first event "
                             "(default: replay everything)")
    parser.add_argument("--metrics-file", metavar="FILE",
                        help="after the replay, write the /metrics text of the replayed state "
                             "to FILE ('-': stdout, after the summary) (default: off)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="after the replay, serve /metrics for the replayed state on "
                             "127.0.0.1:N until interrupted (default: off)")
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: /etc/hekitrace/hekitrace.yaml "
                             "if present, else built-in defaults)")
    return parser


@dataclasses.dataclass
class ReplayResult:
    """What a replay produced: the pipeline (state), findings in order, trace problems."""

    pipeline: Pipeline
    findings: list[Finding]
    problems: list[TraceProblem]
    headers: list[TraceHeader]
    events: int
    first_ns: int | None
    last_ns: int | None
    notices: list[str]


def _until_ns(spec: str, first_ns: int) -> int:
    """The --until limit: RFC 3339, or +SECONDS after ``first_ns``."""
    if spec.startswith("+"):
        return first_ns + round(float(spec[1:]) * 1e9)
    return parse_time(spec)


def configure_for(headers: list[TraceHeader], config: Any) -> tuple[Any, list[str]]:
    """Adopt the recording host's MBEC setting, announced in one line.

    Without MBEC a Heki host re-adds EXEC to every request (docs/heki-abi.md section 5, step 4), so
    replaying an MBEC host's trace with ``mbec: false`` (or the reverse) would invent
    mismatches. ``abi.mbec`` in the config describes the live host; the header records
    how the traced host behaved, which is the fact a replay needs, so it wins.
    """
    notices = []
    recorded = next((h.extra["mbec"] for h in headers
                     if isinstance(h.extra.get("mbec"), bool)), None)
    if recorded is not None and recorded != config.abi.mbec:
        config = dataclasses.replace(config, abi=dataclasses.replace(config.abi, mbec=recorded))
        notices.append(f"note: using abi.mbec={str(recorded).lower()} as recorded in the "
                       "trace header (the config says otherwise)")
    names = {h.abi_profile for h in headers if h.abi_profile}
    if names and config.abi.profile not in names:
        notices.append(f"note: the trace was recorded with ABI profile "
                       f"{', '.join(sorted(names))}; replaying with {config.abi.profile}")
    return config, notices


def replay(paths: Iterable[str], config: Any = None, *, until: str | None = None
           ) -> ReplayResult:
    """Replay ``paths`` in order through one :class:`Pipeline`.

    A file that is not a trace raises :class:`~hekitrace.errors.TraceFormatError` before
    anything is replayed; problems inside traces are collected, never raised.
    """
    problems: list[TraceProblem] = []
    readers: list[TraceReader] = []
    try:
        # a journal directory (the daemon's state dir) stands for its segments, in order
        for path in expand_paths(list(paths)):
            readers.append(open_trace(path, problems))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    if until is not None:
        try:
            if until.startswith("+"):
                float(until[1:])
            else:
                parse_time(until)
        except ValueError:
            raise UsageError(f"--until {until!r}: expected RFC 3339 "
                             "(2026-11-25T15:00:03Z) or +SECONDS") from None
    headers = [r.header for r in readers]
    config, notices = configure_for(headers, config or config_mod.default_config())
    last = [0]
    pipeline = Pipeline(config, clock=lambda: last[0])
    findings: list[Finding] = []
    first_ns: int | None = None
    limit: int | None = None
    feed_many = pipeline.feed_many
    done = False
    for reader in readers:
        for batch in reader.batches(BATCH):
            if not batch:
                continue
            if first_ns is None:
                first_ns = batch[0].time_ns
                if until is not None:
                    limit = _until_ns(until, first_ns)
            if limit is not None and batch[-1].time_ns > limit:
                cut = 0
                while batch[cut].time_ns <= limit:
                    cut += 1
                batch = batch[:cut]
                done = True
            findings += feed_many(batch)
            last[0] = pipeline.last_event_ns
            if done:
                break
        if done:
            break
    for reader in readers:
        reader.close()
    findings += pipeline.flush(pipeline.last_event_ns or None)
    events = sum(pipeline.events_by_kind.values())
    return ReplayResult(pipeline, findings, problems, headers, events, first_ns,
                        pipeline.last_event_ns or None, notices)


# -- output -----------------------------------------------------------------------------------

def _by_vm(findings: list[Finding]) -> dict[Any, list[Finding]]:
    out: dict[Any, list[Finding]] = {}
    for finding in findings:
        out.setdefault(finding.vm_key, []).append(finding)
    return out


def to_document(result: ReplayResult) -> dict:
    """The ``-o json`` document: vms (views.vm_snapshot), findings, lost, problems."""
    pipeline = result.pipeline
    per_vm = _by_vm(result.findings)
    guests = sorted(pipeline.host.guests.values(), key=lambda g: (g.created_ns, g.pid))
    return {
        "vms": [views.vm_snapshot(g, pipeline.abi, per_vm.get(g.key, []), max_findings=0)
                for g in guests],
        "findings": [f.to_dict() for f in result.findings],
        "lost": [{"stage": stage, "reason": reason, "count": count}
                 for (stage, reason), count in sorted(pipeline.lost.items())],
        "problems": [p.to_dict() for p in result.problems],
        "trace": {"events": result.events,
                  "first": format_time(result.first_ns) if result.first_ns else None,
                  "last": format_time(result.last_ns) if result.last_ns else None,
                  "headers": [h.to_dict() for h in result.headers]},
    }


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def render_text(result: ReplayResult) -> str:
    """Readable tables within 80 columns: one block per VM, then findings, losses, problems."""
    doc = to_document(result)
    lines: list[str] = []
    span = ""
    if result.first_ns:
        span = f", {format_time(result.first_ns)[:23]} .. {format_time(result.last_ns or 0)[11:23]}"
    lines.append(_cut(f"replayed {result.events} events from {len(result.headers)} "
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
    findings = result.findings
    critical = sum(1 for f in findings if f.severity == "critical")
    lines += ["", f"FINDINGS: {len(findings)} ({critical} critical)"]
    if findings:
        lines.append(f"{'TIME':<13}{'SEVERITY':<9}{'RULE':<22}{'VM':<12}COUNT")
        for f in findings:
            name = (f.vm or {}).get("name") or f"pid-{(f.vm or {}).get('pid', '?')}"
            lines.append(_cut(f"{format_time(f.time_ns)[11:23]:<13}{f.severity:<9}"
                              f"{f.rule:<22}{_cut(name, 11):<12}{f.count}", WIDTH))
            lines += textwrap.wrap(f.message, WIDTH, initial_indent="  ",
                                   subsequent_indent="    ", break_on_hyphens=False)
    if doc["lost"]:
        lines += ["", "LOST EVENTS"]
        lines += [_cut(f"  {x['stage']}/{x['reason']}: {x['count']}", WIDTH) for x in doc["lost"]]
    if result.problems:
        lines += ["", f"TRACE PROBLEMS: {len(result.problems)}"]
        lines += [_cut(f"  {p}", WIDTH) for p in result.problems]
    return "\n".join(lines) + "\n"


def exit_status(result: ReplayResult) -> int:
    if any(f.severity == "critical" for f in result.findings):
        return EXIT_CRITICAL
    if result.problems:
        return EXIT_PROBLEMS
    return 0


def metrics_registry(result: ReplayResult) -> tuple[Any, Any]:
    """A registry exposing the replayed state exactly as the daemon's /metrics would,
    and the health object the HTTP server reports."""
    from prometheus_client.registry import CollectorRegistry

    from hekitrace.httpserver import Health
    from hekitrace.metrics import HekitraceCollector, LoopStats, build_info

    pipeline = result.pipeline
    stats = LoopStats()
    stats.events_by_kind.update(pipeline.events_by_kind)
    stats.lost.update(pipeline.lost)
    stats.last_event_ns = pipeline.last_event_ns
    stats.ready = True
    stats.config_sha256 = pipeline.config.sha256
    health = Health()
    health.ready = True
    health.not_ready_reasons = ()
    registry = CollectorRegistry(auto_describe=False)

    def state() -> Any:
        return pipeline.host, pipeline.abi, pipeline.policy

    registry.register(HekitraceCollector(state, stats, build_info(),
                                         vm_label=pipeline.config.metrics.vm_label))
    return registry, health


def write_metrics(result: ReplayResult, destination: str) -> None:
    """Write the /metrics text of the replayed state once, to a file or ``-`` (stdout)."""
    from prometheus_client.exposition import generate_latest

    registry, _ = metrics_registry(result)
    text = generate_latest(registry).decode()
    if destination == "-":
        sys.stdout.write("\n# /metrics of the replayed state\n")
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(destination, "w", encoding="utf-8") as out:
            out.write(text)


def serve_metrics(result: ReplayResult, port: int) -> None:
    """Serve /metrics for the replayed state on 127.0.0.1:``port`` until interrupted."""
    import threading

    from hekitrace.httpserver import HttpServer

    registry, health = metrics_registry(result)
    server = HttpServer(f"127.0.0.1:{port}", registry, health)
    server.start()
    print(f"serving the replayed state on http://127.0.0.1:{server.port}/metrics "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = threading.Event()
    try:
        while not stop.wait(1.0):
            health.beat()
    finally:
        server.close()


def run(args: argparse.Namespace) -> int:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port {args.metrics_port}: expected 0-65535")
    config = config_mod.resolve_config(args.config)
    result = replay(args.files, config, until=args.until)
    for notice in result.notices:
        print(f"hekitrace replay: {notice}", file=sys.stderr)
    for problem in result.problems:
        print(f"hekitrace replay: trace problem: {problem}", file=sys.stderr)
    if args.output == "json":
        json.dump(to_document(result), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(result))
    sys.stdout.flush()
    status = exit_status(result)
    if args.metrics_file is not None:
        write_metrics(result, args.metrics_file)
    if args.metrics_port is not None:
        try:
            serve_metrics(result, args.metrics_port)
        except KeyboardInterrupt:
            pass
    return status
