"""Test-suite policy shared by every tier.

With ``CI=true`` (``.ci/run`` sets it) a skip anywhere outside the optional tiers is a
failure: CI runs as root on a machine that can run every tier, so a skip there means
something is broken (a missing package, a missing privilege) and must not pass silently.
That covers both kinds of skip:

* at run time: ``pytest.skip()`` in a test or fixture, ``@pytest.mark.skipif``
  (:func:`pytest_runtest_makereport`);
* at collection: ``pytest.skip(..., allow_module_level=True)`` and
  ``pytest.importorskip()`` at module level, which skip a whole file before any test
  exists (:func:`pytest_make_collect_report`).

The optional tiers (:data:`OPTIONAL_TIERS`) are run on demand only, and skip themselves
unless asked for: ``tests/soak`` (minutes long; ``make soak``, ``HEKITRACE_SOAK=1``).
Every other tier (unit, fuzz, kernel, e2e, vm) runs in ``make test`` and must not skip in
CI. An expected failure (``xfail``) is not a skip. tests/unit/test_ci_skips.py proves
that each kind of skip is caught.

Golden files: the ``golden`` fixture compares an output with its file, and one switch,
``HEKITRACE_UPDATE_GOLDEN=1``, rewrites them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

#: The one switch that rewrites every golden file (README.md "Tests" lists them): set it,
#: run the tests, review the diff.
UPDATE_GOLDEN = "HEKITRACE_UPDATE_GOLDEN"

#: tiers run on demand only (documented in README.md "Tests"); their skips are fine in CI
OPTIONAL_TIERS = ("soak",)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _optional(path: object) -> bool:
    text = str(path).replace(os.sep, "/")
    return any(f"tests/{tier}/" in text or text.endswith(f"tests/{tier}")
               for tier in OPTIONAL_TIERS)


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    if _optional(item.fspath):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which counts as a failure: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level skip or importorskip skips the file at collection, before any test
    report exists: turn that skip into a collection failure under CI."""
    outcome = yield
    report = outcome.get_result()
    if not _in_ci() or not report.skipped:
        return
    if _optional(getattr(collector, "path", collector.fspath)):
        return
    report.outcome = "failed"
    report.longrepr = (f"{collector.nodeid}: skipped at collection in CI, which counts as a "
                       f"failure: {_reason(report.longrepr)}")


def check_golden(path: Path, text: str) -> None:
    """Compare ``text`` with golden file ``path`` (rewrite it first under UPDATE_GOLDEN)."""
    if os.environ.get(UPDATE_GOLDEN):
        path.write_text(text)
    assert text == path.read_text(), (f"output differs from the golden file {path}; if the "
                                      f"change is intended, rerun with {UPDATE_GOLDEN}=1 and "
                                      "review the diff")


@pytest.fixture
def golden() -> Callable[[Path, str], None]:
    """:func:`check_golden`, for the golden-file tests of every tier."""
    return check_golden
