"""Coverage-guided fuzzing (atheris / libFuzzer) of the decoders of untrusted bytes.

Optional and on demand; the normal suite never imports this (pytest does not collect it:
the name does not start with ``test_``). Hypothesis (test_fuzz_*.py) checks properties
on structured inputs; atheris mutates raw bytes guided by line coverage, which finds the
odd branch a structured generator never reaches. Install with
``.venv/bin/pip install atheris`` (or ``pip install -e '.[fuzz]'``), then::

    .venv/bin/python tests/fuzz/atheris_targets.py records -max_total_time=300
    .venv/bin/python tests/fuzz/atheris_targets.py trace   -max_total_time=300 tests/fuzz/corpus
    .venv/bin/python tests/fuzz/atheris_targets.py config  -max_total_time=300
    .venv/bin/python tests/fuzz/atheris_targets.py control -max_total_time=300

(``make fuzz`` runs each for FUZZ_SECONDS.) Any exception other than the target's
documented error is a crash: libFuzzer writes the input to ``crash-<sha1>``; copy it to
tests/fuzz/corpus/ and add a regression test next to the hypothesis target.
"""

from __future__ import annotations

import os
import sys
import tempfile


def _records(data: bytes) -> None:
    from hekitrace.capture import records
    from hekitrace.capture.assemble import ProtectAssembler
    from hekitrace.config.abi import DEFAULT_PROFILE
    if len(data) < 2:
        return
    # first byte: how many spans; the rest is the ring data, spans cut evenly
    n = data[0] % 16 + 1
    buf = data[1:]
    step = max(1, len(buf) // n)
    spans = [(o, min(step, len(buf) - o)) for o in range(0, len(buf), step)]
    stats = records.DecodeStats()
    parts: list = []
    out = records.decode_batch(buf, spans, 0, records.HypercallNumbers.from_profile(
        DEFAULT_PROFILE), parts, stats)
    if len(out) + len(parts) + stats.short + stats.unknown_type != len(spans):
        raise AssertionError("a span was dropped without being counted")
    ProtectAssembler(stale_batches=1).feed(parts)


def _trace(data: bytes) -> None:
    from hekitrace.errors import TraceFormatError
    from hekitrace.trace import file as trace
    with tempfile.NamedTemporaryFile(suffix=".trace") as f:
        f.write(data)
        f.flush()
        try:
            problems: list = []
            for _ in trace.read_events(f.name, problems):
                pass
        except TraceFormatError:
            return
        for p in problems:
            if p.offset is None and p.line is None:
                raise AssertionError(f"problem without a position: {p}")


def _config(data: bytes) -> None:
    from hekitrace.config.settings import parse_config
    from hekitrace.errors import ConfigError
    try:
        parse_config(data.decode("utf-8", "replace"), "fuzz.yaml")
    except ConfigError:
        return


def _control(data: bytes) -> None:
    from hekitrace.service.control import RequestError, parse_request
    try:
        parse_request(data)
    except RequestError:
        return


TARGETS = {"records": _records, "trace": _trace, "config": _config, "control": _control}


def main() -> int:
    import atheris
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]",
              file=sys.stderr)
        return 2
    target = TARGETS[sys.argv[1]]
    with atheris.instrument_imports():
        import hekitrace.capture.assemble
        import hekitrace.capture.records
        import hekitrace.config.settings
        import hekitrace.service.control
        import hekitrace.trace.binary
        import hekitrace.trace.file
        import hekitrace.trace.jsonl  # noqa: F401
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
