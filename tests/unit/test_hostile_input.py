"""Issue 19: every reader of untrusted bytes is bounded, and no input gives a traceback.

The CLI checks run ``replay`` and ``snapshot --from`` in a subprocess under a 512 MB
address-space limit (``prlimit --as``), as the issue's acceptance checks do, and assert
exit status 4 (unreadable trace), one error line naming the file and what was expected,
no traceback, and a few seconds at most.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hekitrace.config.limits import (
    MAX_JSON_DEPTH,
    MAX_JSONL_LINE_BYTES,
    json_depth,
    loads_bounded,
)
from hekitrace.errors import TraceFormatError
from hekitrace.service.control import RequestError, parse_request
from hekitrace.trace.file import open_trace

AS_LIMIT = 512 * 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
#: ``-m`` from the checkout, as the other CLI tests do: this tree's hekitrace, never an
#: installed package that happens to be earlier on sys.path
HEKITRACE = [sys.executable, "-m", "hekitrace.cli"]


def _run_limited(*args: str, timeout: float = 30.0) -> tuple[int, str, float]:
    prefix = ["prlimit", f"--as={AS_LIMIT}"] if shutil.which("prlimit") else []
    started = time.monotonic()
    proc = subprocess.run(prefix + HEKITRACE + list(args), check=False, capture_output=True,
                          text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)
    return proc.returncode, proc.stderr, time.monotonic() - started


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, str]:
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as fh:
        fh.truncate(2 << 30)                      # 2 GB of zeros, no disk used
    long_line = tmp_path / "long.jsonl"
    with open(long_line, "wb") as fh:             # one line well past the record limit
        fh.write(b'{"kind":"hypercall","name":"')
        fh.write(b"a" * (3 * MAX_JSONL_LINE_BYTES))
        fh.write(b'"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    return {"/dev/zero": "/dev/zero", "sparse": str(sparse), "long": str(long_line),
            "deep": str(deep)}


@pytest.mark.parametrize("which", ["/dev/zero", "sparse", "long", "deep"])
@pytest.mark.parametrize("command", [["replay"], ["snapshot", "vm1", "--from"]])
def test_cli_rejects_hostile_trace_in_bounded_memory_and_time(hostile, which, command):
    path = hostile[which]
    status, stderr, seconds = _run_limited(*command, path)
    lines = stderr.strip().splitlines()
    assert status == 4, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert path in lines[0] and "expected the binary magic or a JSON object" in lines[0]
    assert "at byte 0" in lines[0]
    assert seconds < 10, f"{which}: {seconds:.1f} s"


def test_fifo_that_never_ends_a_line_is_rejected(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    stop = threading.Event()

    def feed() -> None:
        try:
            with open(fifo, "wb") as fh:
                while not stop.is_set():
                    fh.write(b"\0" * 65536)
        except (BrokenPipeError, OSError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        status, stderr, seconds = _run_limited("replay", str(fifo))
    finally:
        stop.set()
    assert status == 4 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert seconds < 10


def test_long_and_deep_lines_after_a_good_start_are_skipped_and_reported(tmp_path):
    path = tmp_path / "t.jsonl"
    good = '{"kind":"vm_created","tgid":7,"time_ns":5,"name":"a"}\n'
    path.write_bytes(good.encode() + b"[" * 100_000 + b"\n"
                     + b'{"x":"' + b"y" * (2 * MAX_JSONL_LINE_BYTES) + b'"}\n' + good.encode())
    problems: list = []
    events = list(open_trace(path, problems))
    assert len(events) == 2
    assert [p.line for p in problems] == [2, 3]
    assert "nested more than" in problems[0].message
    assert "longer than" in problems[1].message
    assert all(len(p.message) < 300 for p in problems)


def test_jsonl_first_record_must_come_early(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n" * (MAX_JSONL_LINE_BYTES + 8192) + b'{"kind":"header"}\n')
    with pytest.raises(TraceFormatError, match="found none in the first"):
        open_trace(path)


def test_json_depth_and_bounded_loads():
    assert json_depth(b'{"a":[1,[2]],"s":"[[[[["}') == 3
    assert loads_bounded(b"[[1]]", max_bytes=10) == [[1]]
    with pytest.raises(ValueError, match="nested more than"):
        loads_bounded(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), max_bytes=1000)
    with pytest.raises(ValueError, match="exceeds the 4-byte limit"):
        loads_bounded(b"[1,2]", max_bytes=4)


@pytest.mark.parametrize("line", [b"[" * 60_000, b'{"op":' + b"[" * 60_000,
                                  b'{"op":"status","x":' + b"{\"a\":" * 10_000 + b"1}"])
def test_deep_control_request_is_bad_request_not_internal(line):
    with pytest.raises(RequestError) as caught:
        parse_request(line)
    assert caught.value.code == "bad_request"
    assert "nested" in caught.value.message
