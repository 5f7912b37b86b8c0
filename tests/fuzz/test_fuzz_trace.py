"""Fuzz the trace reader (both encodings) with damaged copies of valid traces.

Traces come from disks that fill up, machines that crash and people who edit them by
hand. The reader's promise (hekitrace/trace/file.py docstring): a file that is not a trace at
all raises TraceFormatError; anything else is read to the end, and every damaged block or
line becomes a TraceProblem with a position (byte offset or line number), never an
exception and never a silent skip. The mutations: flipped bytes, truncations, inserted
junk, duplicated and deleted slices, and (JSON Lines) lines with valid JSON of the wrong
shape. A sample of damaged files also goes through the real ``hekitrace replay`` CLI: a
specific error or a finding, never a Python traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hekitrace.errors import TraceFormatError
from hekitrace.trace import file as trace
from tests.fuzz.fuzzbudget import CORPUS, bounded, budget

SEEDS = {"binary": (CORPUS / "seed-small-blocks.htrace").read_bytes(),
         "jsonl": (CORPUS / "seed.jsonl").read_bytes()}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup", "byte"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 300))]
        else:
            n = draw(st.integers(1, 300))
            data[at:at] = data[at:at + n]
    return bytes(data)


def read_all(path) -> tuple[list, list[trace.TraceProblem]]:
    """Events and problems, or ([], [the TraceFormatError]) for a non-trace."""
    problems: list[trace.TraceProblem] = []
    events = list(trace.read_events(path, problems))
    return events, problems


def check(path) -> None:
    try:
        _events, problems = read_all(path)
    except TraceFormatError as error:
        assert str(error), "a TraceFormatError must say what is wrong"
        return
    for p in problems:
        assert p.offset is not None or p.line is not None, p
        assert p.message


@pytest.mark.parametrize("encoding", ["binary", "jsonl"])
def test_seed_reads_cleanly(encoding, tmp_path):
    path = tmp_path / "t"
    path.write_bytes(SEEDS[encoding])
    events, problems = read_all(path)
    assert problems == [] and len(events) == 60


@given(data=mutated(SEEDS["binary"]))
@budget(200)
@bounded(seconds=10.0, megabytes=32)
def test_damaged_binary_trace_reports_problems_with_offsets(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "t.htrace"
    path.write_bytes(data)
    check(path)


@given(data=mutated(SEEDS["jsonl"]))
@budget(200)
@bounded(seconds=10.0, megabytes=32)
def test_damaged_jsonl_trace_reports_problems_with_lines(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "t.jsonl"
    path.write_bytes(data)
    check(path)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)
KINDS = ["vm_created", "memslot", "protect_request", "attr_applied", "fault", "cr_write",
         "cr_pin_request", "hypercall", "lost", "vm_destroyed", "attr_ioctl", "header"]


@st.composite
def wrong_shape_line(draw) -> bytes:
    """A JSON object whose fields are the right names with values of any shape."""
    seed_lines = [json.loads(x) for x in SEEDS["jsonl"].splitlines()[1:]]
    obj = dict(draw(st.sampled_from(seed_lines)))
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3)):
        obj[key] = draw(JSONISH)
    if draw(st.booleans()):
        obj["kind"] = draw(st.sampled_from(KINDS))
    return json.dumps(obj).encode()


@given(lines=st.lists(wrong_shape_line(), min_size=1, max_size=8))
@budget(300)
@bounded(seconds=10.0, megabytes=32)
def test_jsonl_lines_of_the_wrong_shape_are_problems_not_crashes(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "t.jsonl"
    path.write_bytes(SEEDS["jsonl"] + b"\n".join(lines) + b"\n")
    events, problems = read_all(path)
    assert len(events) >= 60            # the valid prefix is never lost
    # a later "header" line is skipped by design (only the first header counts;
    # trace.py _lines): every other line is an event or a problem
    headers = sum(1 for x in lines if json.loads(x).get("kind") == "header")
    assert len(events) + len(problems) == 60 + len(lines) - headers
    assert all(p.line is not None for p in problems)


@st.composite
def hostile_line(draw) -> bytes:
    """A line built to exhaust a reader: deep nesting, a huge string, or both."""
    depth = draw(st.integers(0, 200_000))
    opener = draw(st.sampled_from([b"[", b'{"a":', b'{"kind":"fault","tgid":']))
    filler = b"x" * draw(st.sampled_from([0, 10, 1 << 20, (1 << 20) + 1, 3 << 20]))
    return opener * depth + b'"' + filler + b'"' + draw(st.sampled_from([b"", b"]" * depth]))


@given(lines=st.lists(hostile_line(), min_size=1, max_size=3),
       header_first=st.booleans())
@budget(40)
@bounded(seconds=10.0, megabytes=64)
def test_deep_and_long_jsonl_lines_cost_bounded_memory_and_time(lines, header_first,
                                                               tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "t.jsonl"
    head = SEEDS["jsonl"] if header_first else b""
    path.write_bytes(head + b"\n".join(lines) + b"\n")
    try:
        events, problems = read_all(path)
    except TraceFormatError as error:
        assert not header_first and "expected" in str(error)
        return
    assert len(events) >= (60 if header_first else 0)
    assert all(p.line is not None and len(p.message) < 400 for p in problems)


# Damaged files through the real CLI: exit status 0 (read, problems reported), 1 (a
# critical finding) or 4 (EXIT_DATA: not a trace),
# never 5 (an unexpected error) and never a traceback.
CLI_CASES = {
    "flipped-magic.htrace": lambda b: b"\x88" + b[1:],
    "header-only.htrace": lambda b: b[:40],
    "torn-last-block.htrace": lambda b: b[:-37],
    "junk-in-the-middle.htrace": lambda b: b[:2000] + b"\xf5HKBLK\n\x00" + b"\xff" * 40
    + b[2000:],
    "empty.jsonl": lambda b: b"",
    "binary-junk.jsonl": lambda b: bytes(range(256)),
    "wrong-types.jsonl": lambda b: b'{"kind":"protect_request","tgid":[1],"entries":{}}\n',
    "huge-ints.jsonl": lambda b: b'{"kind":"memslot","time_ns":1e400,"tgid":' + b"9" * 5000
    + b',"slot":-1,"gpa":"0xzz"}\n',
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_damaged_trace_through_replay_cli_never_prints_a_traceback(name, tmp_path):
    seed = SEEDS["binary" if name.endswith(".htrace") else "jsonl"]
    path = tmp_path / name
    path.write_bytes(CLI_CASES[name](seed))
    proc = subprocess.run([sys.executable, "-m", "hekitrace.cli", "replay", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode in (0, 1, 4), proc.stderr  # ok, findings, bad data
    if proc.returncode:
        assert proc.stderr.strip(), "a failure must say why"
