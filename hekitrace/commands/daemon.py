"""``hekitrace daemon``: run the monitoring service in the foreground.

This module only parses options and wires real components into
:class:`hekitrace.daemon.Daemon`; everything the daemon does is in the library. Parts
that are not installed (the capture engine, uevents, discovery, the journal) are
announced in one line each at start-up, never skipped silently.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import signal
import sys
from collections.abc import Callable
from typing import Any

EPILOG = """\
examples:
  hekitrace daemon                          # defaults; metrics on 127.0.0.1:9864
  hekitrace daemon --config /etc/hekitrace/hekitrace.yaml --foreground-status
  curl -s localhost:9864/metrics | grep ^hekitrace_vms
  kill -HUP $(pidof -s hekitrace)           # reload the config (a bad one is rejected)

Under systemd use packaging/systemd/hekitrace.service (Type=notify, watchdog).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "daemon", help="run the monitoring daemon (metrics, control socket, alerts)",
        description="Attach the BPF hooks, rebuild every guest's permission map, flag "
                    "violations, serve /metrics, /healthz, /readyz and the control socket. "
                    "Stops cleanly on SIGTERM/SIGINT (programs detached); SIGHUP reloads "
                    "the config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML configuration (default: /etc/hekitrace/hekitrace.yaml if it "
                             "exists, else built-in defaults)")
    parser.add_argument("--foreground-status", action="store_true",
                        help="also print the periodic one-line status to stderr "
                             "(default: only sent to systemd as STATUS=)")
    return parser


def _optional(module: str, attr: str) -> Any:
    """``module.attr`` if that part of hekitrace is installed, else None (announced)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        print(f"hekitrace daemon: {module}.{attr} unavailable ({error}); continuing without it",
              file=sys.stderr)
        return None


_HOOKS = ("hypercall", "attr_applied", "ioctl", "page_fault", "cr")


def build_daemon(args: argparse.Namespace) -> Any:
    from hekitrace.config import resolve_config
    from hekitrace.daemon import Daemon
    from hekitrace.pipeline import Pipeline

    config = resolve_config(args.config)
    capture_cls = _optional("hekitrace.capture.engine", "Capture")

    def capture_factory(cfg: Any, say: Callable[[str], None]) -> Any:
        # Every hook optional for the engine: a missing required hook makes the daemon
        # "not ready" (with the reason, /readyz and hekitrace_ready) instead of exiting.
        assert capture_cls is not None
        return capture_cls(cfg, required={h: False for h in _HOOKS}, say=say).start()

    uevents_cls = _optional("hekitrace.capture.uevents", "UeventSource")
    discover_fn = _optional("hekitrace.capture.discovery", "discover_vms")
    # the state journal (issue 9): checkpoint + replay at start, then every event journaled
    recovery_cls = (_optional("hekitrace.recovery", "JournalRecovery")
                    if config.journal.enabled else None)
    alerts_cls = _optional("hekitrace.alerts", "AlertSink")
    alert_sink = alerts_cls.from_config(config.alerts) if alerts_cls is not None else None
    return Daemon(
        config, config.path, load_config=resolve_config,
        pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied_hook_active=applied),
        capture_factory=capture_factory if capture_cls is not None else None,
        uevents_factory=uevents_cls,
        discover=discover_fn,
        recovery=recovery_cls(config) if recovery_cls is not None else None,
        alert_sink=alert_sink,
        foreground_status=args.foreground_status)


def run(args: argparse.Namespace) -> int:
    # SIGUSR1 dumps every thread's stack to stderr: the first thing to ask for when a
    # daemon looks stuck (journalctl shows it), and it costs nothing until used.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    daemon = build_daemon(args)
    try:
        daemon.start()
        reason = daemon.run()
        daemon.say(f"{reason} received, stopping")
    finally:
        daemon.close()
    return 0
