"""hekitrace replay: the document, the text tables, exit statuses, --until, /metrics."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from hekitrace.commands import replay as replay_cmd
from hekitrace.config.settings import default_config
from hekitrace.errors import TraceFormatError, UsageError
from hekitrace.replay import replay
from hekitrace.sim import scenarios
from hekitrace.trace.file import TraceHeader
from hekitrace.trace.writer import write_events

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "traces"
EXAMPLES = ROOT / "examples"
HEADER = TraceHeader(abi_profile="heki-v2", extra={"mbec": True})


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    replay_cmd.add_parser(sub)
    args = parser.parse_args(["replay", *argv])
    # never read the host's /etc/hekitrace config from a unit test
    if args.config is None:
        args.config = str(FIXTURES / "empty-config.yaml")
    status = replay_cmd.run(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_text_output_matches_golden(capsys):
    status, out, err = _run(capsys, str(FIXTURES / "hand-written.jsonl"))
    assert status == 1
    assert out == (FIXTURES / "hand-written.replay.txt").read_text()
    assert "mbec=true" in err  # the config says false: the header's MBEC wins, announced


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir()
                                           if p.suffix in (".jsonl", ".htrace")))
def test_examples_replay_within_80_columns(capsys, example):
    status, out, _ = _run(capsys, str(EXAMPLES / example))
    assert status == (1 if example == "attack.jsonl" else 0)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "TRACE PROBLEMS" not in out


def test_json_document(capsys):
    status, out, _ = _run(capsys, "-o", "json", str(EXAMPLES / "attack.jsonl"))
    doc = json.loads(out)
    assert status == 1
    assert set(doc) >= {"vms", "findings", "lost", "problems"}
    assert {v["vm"]["name"] for v in doc["vms"]} == {scenarios.SCENARIOS[a][1] for a in scenarios.ATTACKS}
    assert {f["rule"] for f in doc["findings"]} == scenarios.expected_findings(["all-attacks"])
    first = doc["findings"][0]
    assert set(first) >= {"rule", "severity", "time", "time_ns", "vm", "message", "count",
                          "evidence"}
    ranges = doc["vms"][0]["ranges"]
    assert any(r["requested"]["class"] == "r-x_immutable" for r in ranges)
    assert doc["problems"] == [] and doc["lost"] == []


def _damaged_copy(tmp_path, source):
    path = tmp_path / "damaged.htrace"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_problems_give_exit_4_and_are_listed(tmp_path, capsys):
    path = _damaged_copy(tmp_path, EXAMPLES / "multi-vm.htrace")
    status, out, err = _run(capsys, str(path))
    assert status == 4
    assert "TRACE PROBLEMS: 1" in out and "trace problem" in err
    status, out, _ = _run(capsys, "-o", "json", str(path))
    problem = json.loads(out)["problems"][0]
    assert problem["offset"] > 0 and "checksum" in problem["message"]


def test_critical_finding_wins_over_problems(tmp_path, capsys):
    path = _damaged_copy(tmp_path, EXAMPLES / "multi-vm.htrace")
    status, _, _ = _run(capsys, str(path), str(EXAMPLES / "attack.jsonl"))
    assert status == 1


def test_not_a_trace_raises_before_replaying(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    with pytest.raises(TraceFormatError):
        replay([str(EXAMPLES / "attack.jsonl"), str(junk)], default_config())


def test_until_stops_at_the_given_time(tmp_path):
    events = scenarios.simulate(["attack-write-text"])
    path = tmp_path / "a.htrace"
    write_events(path, events, HEADER)
    fault_ns = events[-1].time_ns
    before = replay([str(path)], default_config(),
                               until=f"+{(fault_ns - events[0].time_ns) / 1e9 - 0.01:.3f}")
    assert before.findings == [] and before.events == len(events) - 1
    everything = replay([str(path)], default_config(), until="2099-01-01T00:00:00Z")
    assert [f.rule for f in everything.findings] == ["protected_write"]
    with pytest.raises(UsageError):
        replay([str(path)], default_config(), until="soon")


def test_files_replay_in_order_as_one_stream(tmp_path):
    events = scenarios.simulate(["attack-clear-smep"])
    half = len(events) // 2
    write_events(tmp_path / "1.htrace", events[:half], HEADER)
    write_events(tmp_path / "2.jsonl", events[half:], HEADER, encoding="jsonl")
    result = replay([str(tmp_path / "1.htrace"), str(tmp_path / "2.jsonl")],
                               default_config())
    assert result.events == len(events)
    assert [f.rule for f in result.findings] == ["cr_pin_violation"]


DRIVER = """
import argparse, sys
from hekitrace.commands import replay
p = argparse.ArgumentParser(); s = p.add_subparsers(); replay.add_parser(s)
sys.exit(replay.run(p.parse_args(sys.argv[1:])))
"""


def test_metrics_port_serves_the_replayed_state(tmp_path):
    """A real process serves real HTTP until SIGINT; its exit status is the replay's."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "replay", "--metrics-port", "0",
         "--config", str(FIXTURES / "empty-config.yaml"), str(EXAMPLES / "attack.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the replay never said where it serves"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read()
        text = body.decode()
        assert 'hekitrace_vm_info{' in text and 'vm="victim-wt"' in text
        assert re.search(r'hekitrace_findings_total\{[^}]*rule="protected_write"', text)
        assert re.search(r'hekitrace_events_total\{kind="protect_request"\} [1-9]', text)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_replay_of_a_journal_directory_equals_replay_of_its_segments(tmp_path):
    """`hekitrace replay DIR` reads the daemon's journal directory segment by segment."""
    import shutil

    from hekitrace.replay import replay, to_document

    shutil.copy(EXAMPLES / "clean-guest.htrace", tmp_path / "journal-000001.htrace")
    from_dir = to_document(replay([str(tmp_path)]))
    from_file = to_document(replay([str(EXAMPLES / "clean-guest.htrace")]))
    assert from_dir["vms"] and from_dir == from_file


T_REC = 1_795_000_000_000_000_000


@pytest.mark.parametrize("order", ["ioctl_first", "uevent_first_without_stats_path"])
def test_duplicated_creation_replays_as_one_named_guest(tmp_path, capsys, order):
    """`record` writes vm_created from the ioctl hook and from the uevent (and discovery)
    for one VM; replay must show one guest, named, as the daemon's state does."""
    from hekitrace.state.events import Hypercall, VmCreated
    ioctl = VmCreated(T_REC, 4242, 4242, vm_fd=11, source="ioctl")
    if order == "ioctl_first":
        uevent = VmCreated(T_REC + 3_000_000, 4242, 4243, vm_fd=11, stats_path="/kvm/4243-11",
                           name="web1", uuid="u-1", vmm="qemu", source="uevent")
        events = [ioctl, uevent]
    else:  # no debugfs: the uevent has no STATS_PATH, hence no fd; the ioctl follows
        uevent = VmCreated(T_REC, 4242, 4243, name="web1", uuid="u-1", vmm="qemu",
                           source="uevent")
        events = [uevent, ioctl._replace(time_ns=T_REC + 1_000_000)]
    discovery = VmCreated(T_REC + 10**9, 4242, 4242, vm_fd=11, name="web1",
                          source="discovery", preexisting=True)
    events += [Hypercall(T_REC + 5_000_000, 4242, 4242, 0x99, 0, 0, 0, 0), discovery]
    path = tmp_path / "dup.jsonl"
    write_events(path, events, HEADER, encoding="jsonl")
    result = replay([str(path)], default_config())
    host = result.pipeline.host
    assert len(host.guests) == 1
    guest = host.by_tgid(4242)
    assert (guest.name, guest.uuid, guest.vm_fd) == ("web1", "u-1", 11)
    assert not guest.degraded  # seen being born: discovery's "preexisting" is merged away
    assert host.counters["merged_creations"] == 2
    status, out, _ = _run(capsys, "-o", "json", str(path))
    assert [v["vm"]["name"] for v in json.loads(out)["vms"]] == ["web1"]


def test_a_second_vm_of_one_vmm_is_not_merged(tmp_path):
    from hekitrace.state.events import VmCreated
    events = [VmCreated(T_REC, 4242, 4242, vm_fd=11, source="ioctl"),
              VmCreated(T_REC + 1, 4242, 4242, vm_fd=12, source="ioctl")]
    path = tmp_path / "two.jsonl"
    write_events(path, events, HEADER, encoding="jsonl")
    host = replay([str(path)], default_config()).pipeline.host
    assert len(host.guests) == 2 and host.counters["merged_creations"] == 0


def test_progress_on_a_terminal_only(tmp_path):
    """On a terminal, stderr shows the replay's progress; piped, stderr stays silent."""
    import fcntl
    import pty
    import struct
    import termios

    trace = str(EXAMPLES / "multi-vm.htrace")
    cmd = [sys.executable, "-c", DRIVER, "replay", "--config",
           str(FIXTURES / "empty-config.yaml"), trace]
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert piped.returncode in (0, 1) and "replay:" not in piped.stderr.replace(
        "hekitrace replay:", "")                       # notes, but no progress bar
    leader, follower = pty.openpty()
    # a terminal has a size (a fresh pty has none, and a bar of width 0 prints nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    out, _ = proc.communicate(timeout=120)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.returncode == piped.returncode and out == piped.stdout
    assert b"replay:" in shown and b"B/s" in shown, shown
