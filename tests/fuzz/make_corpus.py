"""Regenerate the seed corpus in tests/fuzz/corpus/ (committed; run by hand).

Seeds are small on purpose: mutations of a small valid input reach the decoders' edge
cases far more often than mutations of a large one. ``python tests/fuzz/make_corpus.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

from hekitrace.sim import scenarios
from hekitrace.trace import file as trace

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> int:
    events = scenarios.simulate(["attack-write-text"], seed=11)[:60]
    header = trace.TraceHeader()
    with trace.TraceWriter(CORPUS / "seed-small-blocks.htrace", header,
                           block_bytes=256) as w:   # many small blocks: damage stays local
        w.write_all(events)
    trace.write_events(CORPUS / "seed.jsonl", events, header, encoding="jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
