"""What a config reload (SIGHUP) changes in a running daemon, and what waits for a restart.

The ``policy`` section (rules, severities, exceptions, windows) takes effect at once: a
new Policy replaces the old one and keeps its findings counts, so
``hekitrace_findings_total`` stays monotonic. The other sections configure parts built
at start-up (hooks, rings, sockets, journal, state limits, alert sinks); a change to
them is said in the log ("take effect after a restart"), never silently ignored.
"""

from __future__ import annotations

from hekitrace.config.settings import Config
from hekitrace.pipeline import Pipeline
from hekitrace.policy.engine import Policy

#: config sections a reload cannot change in a running daemon, in the order named
RESTART_SECTIONS = ("abi", "hooks", "capture", "control", "metrics", "journal", "state",
                    "alerts")


def restart_needed(old: Config, new: Config) -> list[str]:
    """The sections of :data:`RESTART_SECTIONS` that differ between ``old`` and ``new``."""
    pairs: dict[str, tuple[object, object]] = {
        "abi": (old.abi, new.abi), "hooks": (old.hooks, new.hooks),
        "capture": (old.capture, new.capture), "control": (old.control, new.control),
        "metrics": (old.metrics, new.metrics), "journal": (old.journal, new.journal),
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
