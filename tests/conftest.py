"""Test-suite policy shared by every tier.

With ``CI=true`` a skipped test in the kernel, e2e or vm tier is a failure: CI runs as
root on a machine that can run all of them, so a skip there means something is broken
(missing package, missing privilege) and must not pass silently.
"""

from __future__ import annotations

import os

import pytest

_STRICT_TIERS = ("kernel", "e2e", "vm")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _in_ci() or not report.skipped:
        return
    if any(item.get_closest_marker(tier) for tier in _STRICT_TIERS) or any(
            f"tests/{tier}/" in str(item.fspath).replace(os.sep, "/") for tier in _STRICT_TIERS):
        if hasattr(report, "wasxfail"):
            return
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which counts as a failure: {reason}"
