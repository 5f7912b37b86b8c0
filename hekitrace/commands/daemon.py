"""``hekitrace daemon``: run the monitoring service in the foreground.

This module only parses options and wires real components into
:class:`hekitrace.service.daemon.Daemon`; everything the daemon does is in the library.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
from collections.abc import Callable

from hekitrace.capture import hooks
from hekitrace.capture.discovery import discover_vms
from hekitrace.capture.engine import Capture
from hekitrace.capture.uevents import UeventSource
from hekitrace.config.settings import Config, resolve_config
from hekitrace.journal.recovery import JournalRecovery
from hekitrace.pipeline import Pipeline
from hekitrace.service.alerts import AlertSink
from hekitrace.service.daemon import Daemon

EPILOG = """\
examples:
  hekitrace daemon                          # defaults; metrics on 127.0.0.1:9864
  hekitrace daemon --config /etc/hekitrace/hekitrace.yaml --foreground-status
  curl -s localhost:9864/metrics | grep ^hekitrace_vms
  systemctl reload hekitrace                # reload the config (a bad one is rejected)
  pkill -HUP -f 'hekitrace daemon'          # the same without systemd (any install)

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


def build_daemon(args: argparse.Namespace) -> Daemon:
    config = resolve_config(args.config)

    def capture_factory(cfg: Config, say: Callable[[str], None]) -> Capture:
        # Every hook optional for the engine: a missing required hook makes the daemon
        # "not ready" (with the reason, /readyz and hekitrace_ready) instead of exiting.
        return Capture(cfg, required={h: False for h in hooks.NAMES}, say=say).start()

    # the state journal: checkpoint + replay at start, then every event journaled;
    # without it (journal.enabled: false) the daemon says so and starts empty
    recovery = JournalRecovery(config) if config.journal.enabled else None
    return Daemon(
        config, config.path, load_config=resolve_config,
        pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied_hook_active=applied),
        capture_factory=capture_factory,
        uevents_factory=UeventSource,
        discover=discover_vms,
        recovery=recovery,
        alert_sink=AlertSink.from_config(config.alerts),
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
