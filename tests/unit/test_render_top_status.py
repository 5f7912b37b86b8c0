"""render.top (the frames of `hekitrace top`) and render.status_text, without a daemon."""

from __future__ import annotations

import pytest

from hekitrace.render.status_text import render_status
from hekitrace.render.top import frame, render_frame

T = 1_795_000_000_000_000_000


def _row(name, pid, hypercalls, faults=0, findings=0, state="running", degraded=False):
    return {"name": name, "pid": pid, "uuid": None, "created_ns": T + pid, "state": state,
            "degraded": degraded, "locked_down": True, "findings": findings,
            "counters": {"hypercall": hypercalls, "fault": faults, "protect_request": 3}}


STATUS = {"ready": True, "vms": 3, "events_total": {"hypercall": 900, "fault": 4},
          "events_lost_total": [{"stage": "ring", "reason": "telemetry_full", "count": 7}],
          "queue_depth_events": 2}


def test_frame_rates_are_deltas_per_second_and_new_vms_count_from_zero():
    before = [_row("web1", 10, 100), _row("db1", 20, 50, faults=10)]
    after = [_row("web1", 10, 300), _row("db1", 20, 60, faults=30), _row("new", 30, 40)]
    doc = frame(before, after, 2.0, STATUS)
    rates = {v["name"]: v["rates"] for v in doc["vms"]}
    assert rates["web1"]["hc"] == 100.0 and rates["db1"]["hc"] == 5.0
    assert rates["db1"]["fault"] == 10.0 and rates["new"]["hc"] == 20.0
    assert [v["name"] for v in doc["vms"]] == ["web1", "new", "db1"]      # by hc rate
    assert doc["events_lost_total"] == 7 and doc["events_total"] == 904


def test_frame_sorts_filters_and_never_shows_negative_rates():
    before = [_row("web1", 10, 500), _row("web2", 11, 5, findings=9)]
    after = [_row("web1", 10, 400), _row("web2", 11, 6, findings=9), _row("db", 12, 1)]
    doc = frame(before, after, 1.0, STATUS, sort="find", vm="web*")
    assert [v["name"] for v in doc["vms"]] == ["web2", "web1"]
    assert doc["vms"][1]["rates"]["hc"] == 0.0          # a counter that went back
    assert [v["name"] for v in frame(before, after, 1.0, STATUS, vm="12")["vms"]] == ["db"]
    assert [v["name"] for v in frame(before, after, 1.0, STATUS, sort="name")["vms"]] == \
        ["db", "web1", "web2"]


@pytest.mark.parametrize("width", [60, 80, 132])
def test_frame_fits_the_terminal(width):
    rows = [_row("a-very-long-virtual-machine-name", 4242, 10**7, degraded=True)]
    lines = render_frame(frame([], rows, 1.0, STATUS), width, height=5)
    assert all(len(line) <= width for line in lines) and len(lines) <= 5
    assert "!" in lines[3] and "10000k" in lines[3]


def test_status_table_says_why_each_hook_and_rule_is_inactive():
    status = {"version": "0.1.0", "pid": 7, "uptime_seconds": 3600, "ready": False,
              "not_ready_reasons": ["required hook attr_applied not attached: absent"],
              "hooks": [{"hook": "hypercall", "method": "raw_tracepoint", "required": True,
                         "attached": True, "reason": None},
                        {"hook": "attr_applied", "method": None, "required": True,
                         "attached": False, "reason": "absent from this kernel"}],
              "vms": 2, "events_total": {"hypercall": 5}, "events_lost_total": [],
              "queue_depth_events": 0, "queue_capacity_events": 65536,
              "config": {"path": None, "sha256": "e3b0c44298fc1c14", "reload_success": False},
              "internal_errors": 1, "journal": None,
              "policy": {"pairing": "inactive: the attr_applied hook is not attached",
                         "rules": {"wx_request": "active",
                                   "request_not_applied": "inactive: no attr hook"}}}
    text = render_status(status)
    assert "NOT READY" in text.splitlines()[0]
    assert "absent from this kernel" in text and "inactive: no attr hook" in text
    assert "LAST RELOAD FAILED" in text and "internal_errors 1" in text
    assert "journal  off" in text and "(built-in defaults)" in text
    assert all(len(line) <= 80 for line in text.splitlines())
