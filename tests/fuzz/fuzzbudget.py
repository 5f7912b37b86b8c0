"""How long each fuzz target runs: bounded in the normal suite, long on demand.

The normal suite (``pytest tests``) runs every target for a few seconds: a fixed number
of examples, small enough that the whole fuzz directory stays under a minute on 2 cores.
``HYPOTHESIS_PROFILE=fuzz`` (what ``make fuzz`` sets) multiplies the budget by
:data:`FUZZ_FACTOR` and keeps hypothesis' example database under
``tests/fuzz/corpus/hypothesis`` so a long run resumes from what it found before.

Why per-target settings and not only the shared profiles of tests/strategies.py: the
targets differ by two orders of magnitude in cost per example (a Python decode vs a
BPF_PROG_TEST_RUN vs a socket round trip), so each names its own budget.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

FUZZ_FACTOR = 100
CORPUS = Path(__file__).resolve().parent / "corpus"


def long_run() -> bool:
    """True under ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``)."""
    return os.environ.get("HYPOTHESIS_PROFILE", "") == "fuzz"


def budget(examples: int) -> settings:
    """Settings for one target: ``examples`` in the normal suite, x100 under fuzz."""
    if long_run():
        return settings(max_examples=examples * FUZZ_FACTOR, deadline=None,
                        suppress_health_check=list(HealthCheck),
                        database=DirectoryBasedExampleDatabase(str(CORPUS / "hypothesis")))
    return settings(max_examples=examples, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), database=None)
