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

import functools
import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (proc(5), clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def bounded(seconds: float, megabytes: float) -> Callable[[Callable], Callable]:
    """Per example, assert that the target took at most ``seconds`` and that the process's
    peak resident memory grew by at most ``megabytes`` during it: "no crash" is not
    enough, a reader that slurps its input or loops on it fails too. Put it under
    ``@given`` so each example is measured on its own.

    Memory is the kernel's own peak RSS (VmHWM, reset before each example through
    /proc/self/clear_refs), which costs nothing per allocation; where that reset is not
    allowed, tracemalloc's peak of Python allocations instead. The time bound is far
    above an example's usual cost (milliseconds): it catches a reader that loops or goes
    quadratic, not a slow machine."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            kernel = _reset_peak_rss()
            started_here = False
            if kernel:
                base = _status_kib("VmRSS") * 1024
            else:
                started_here = not tracemalloc.is_tracing()
                if started_here:
                    tracemalloc.start()
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
            began = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                if kernel:
                    peak = _status_kib("VmHWM") * 1024 - base
                else:
                    peak = tracemalloc.get_traced_memory()[1] - base
                    if started_here:
                        tracemalloc.stop()
            assert elapsed <= seconds, \
                f"{fn.__name__}: one example took {elapsed:.2f} s (bound {seconds} s)"
            assert peak <= megabytes * (1 << 20), \
                f"{fn.__name__}: one example grew peak memory by {peak / (1 << 20):.1f} MiB " \
                f"(bound {megabytes} MiB)"
            return result
        return inner
    return wrap
