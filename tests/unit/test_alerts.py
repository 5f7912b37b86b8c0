"""Alert sink: JSON Lines and text output, file reopen, and never raising on write errors."""

from __future__ import annotations

import io
import json
import os

import pytest

from hekitrace.policy.findings import Finding
from hekitrace.service.alerts import AlertSink, format_text
from hekitrace.state.changes import VmKey

T0 = 1_795_000_000_123_456_000


def finding(rule="wx_request", count=1):
    return Finding(rule, "critical", T0, {"name": "web1", "uuid": "u-1", "pid": 42,
                                          "created_ns": T0 - 1}, VmKey(42, T0 - 1),
                   "guest requested write+execute on gfns 0x8000-0x8010",
                   {"gfn_start": 0x8000, "gfn_end": 0x8010, "new": "rwx"}, count)


def test_json_lines_on_stream_one_object_per_line():
    out = io.StringIO()
    sink = AlertSink(stream=out)
    sink(None, [finding(), finding("protected_write", 7)])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["rule"] == "wx_request" and first["time"] == "2026-11-18T11:06:40.123456Z"
    assert first["vm"]["pid"] == 42 and first["evidence"]["new"] == "rwx"
    assert json.loads(lines[1])["count"] == 7
    assert sink.written == 2 and sink.write_errors == {}


def test_text_format_one_human_line():
    out = io.StringIO()
    AlertSink(stream=out, fmt="text").write(finding(count=3))
    line = out.getvalue()
    assert line.count("\n") == 1
    assert "CRITICAL" in line and "wx_request vm=web1 pid=42" in line and line.endswith("(x3)\n")
    assert format_text(finding().to_dict()).startswith("2026-11-18T11:06:40.123456Z CRITICAL")


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="expected one of json, text"):
        AlertSink(fmt="yaml")


def test_file_append_and_reopen_after_logrotate(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"old": 1}\n')
    sink = AlertSink(stdout=False, path=str(path))
    sink.write(finding())
    os.rename(path, tmp_path / "alerts.jsonl.1")       # logrotate moves the file away
    sink.write(finding("protected_write"))             # still goes to the moved file
    sink.request_reopen()                              # SIGHUP
    sink.write(finding("cr_pin_violation"))
    sink.close()
    rotated = (tmp_path / "alerts.jsonl.1").read_text().splitlines()
    assert [json.loads(x).get("rule") for x in rotated] == [None, "wx_request",
                                                            "protected_write"]
    assert json.loads(path.read_text())["rule"] == "cr_pin_violation"


def test_full_disk_is_counted_not_raised():
    sink = AlertSink(stdout=False, path="/dev/full")
    assert sink.write(finding()) is False
    assert sink.write(finding()) is False
    assert sink.write_errors == {("file", "ENOSPC"): 2}
    assert "No space left" in sink.last_error


def test_closed_pipe_is_counted_not_raised():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = os.fdopen(write_fd, "w")
    sink = AlertSink(stream=stream)
    assert sink.write(finding()) is False
    assert sink.write_errors_total == 1
    assert ("stdout", "EPIPE") in sink.write_errors
    stream.close = lambda: None  # the broken buffer would raise again at interpreter exit


def test_closed_stream_and_unwritable_directory(tmp_path):
    out = io.StringIO()
    out.close()
    sink = AlertSink(stream=out, path=str(tmp_path / "missing" / "alerts.jsonl"))
    assert sink.write(finding()) is False
    assert sink.write_errors[("stdout", "closed")] == 1
    assert sink.write_errors[("file", "ENOENT")] >= 1
    (tmp_path / "missing").mkdir()
    sink.reopen()
    assert sink.write(finding()) is False              # stdout still closed
    assert (tmp_path / "missing" / "alerts.jsonl").read_text().count("\n") == 1
