"""The daemon's signals: SIGTERM and SIGINT stop the loop, SIGHUP reloads the config.

Handlers only set a flag; the loop acts on it between iterations, so a signal never runs
daemon code in the middle of a batch. A wake-up socket pair (``signal.set_wakeup_fd``)
registered in the loop's selector makes ``select()`` return as soon as a signal
arrives instead of at the next timer. The handlers that were installed before are put
back by :meth:`Signals.restore`, so a process embedding the daemon (tests, benches) gets
its own back.

A reload changes the ``policy`` section (rules, severities, exceptions, windows) at once:
a new Policy replaces the old one and keeps its findings counts, so
``hekitrace_findings_total`` stays monotonic. The other sections configure parts built
at start-up (hooks, rings, sockets, journal, state limits, alert sinks); a change to
them is said in the log ("take effect after a restart"), never silently ignored. The one
exception is ``metrics.tls``: the daemon reloads its files on every SIGHUP (a renewed
certificate) and serves new connections with them.
"""

from __future__ import annotations

import dataclasses
import selectors
import signal
import socket
from typing import Any

from hekitrace.config.settings import Config
from hekitrace.pipeline import Pipeline
from hekitrace.policy.engine import Policy

#: config sections a reload cannot change in a running daemon, in the order named
RESTART_SECTIONS = ("abi", "hooks", "capture", "control", "metrics", "journal", "state",
                    "alerts")


class Signals:
    """``stop_reason`` is the name of the signal that asked to stop (None: keep going);
    :meth:`take_reload` says once whether SIGHUP came since it was last asked."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self._reload_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._old_handlers: dict[int, Any] = {}

    def install(self, selector: selectors.BaseSelector) -> None:
        """Install the handlers and register the wake-up socket in ``selector``."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)

    def take_reload(self) -> bool:
        """Whether a reload was asked for since the last call."""
        requested, self._reload_requested = self._reload_requested, False
        return requested

    def restore(self) -> None:
        """Stop the wake-ups and put the previous handlers back (idempotent)."""
        signal.set_wakeup_fd(-1)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stop_reason = signal.Signals(signum).name

    def _on_wake(self, sock: socket.socket, mask: int) -> None:
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass


def restart_needed(old: Config, new: Config) -> list[str]:
    """The sections of :data:`RESTART_SECTIONS` that differ between ``old`` and ``new``."""
    pairs: dict[str, tuple[object, object]] = {
        "abi": (old.abi, new.abi), "hooks": (old.hooks, new.hooks),
        "capture": (old.capture, new.capture), "control": (old.control, new.control),
        "metrics": (dataclasses.replace(old.metrics, tls=new.metrics.tls), new.metrics),
        "journal": (old.journal, new.journal),
        "state": (old.state, new.state), "alerts": (old.alerts, new.alerts)}
    return [name for name in RESTART_SECTIONS if pairs[name][0] != pairs[name][1]]


def reloaded_policy(pipeline: Pipeline, new: Config) -> Policy:
    """A Policy built from ``new``'s ``policy`` section for ``pipeline``, keeping the old
    policy's findings counts and whether the applied hook is active. Its pairing checks
    and storm summaries start empty: those in flight in the old policy are dropped (the
    caller says so in the log)."""
    old = pipeline.policy
    policy = Policy(new.policy, pipeline.abi, pipeline.clock,
                    applied_hook_active=old.applied_hook_active,
                    max_entries_inspected=int(new.state.max_entries_per_request))
    policy.counts = old.counts
    return policy
