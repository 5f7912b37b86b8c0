"""Issue 19: files hekitrace writes are created 0600 in directories it creates 0700
(journal segments and checkpoints, the alert file, ``record`` traces), unless the config
says otherwise; an existing file keeps its mode. Run with a permissive umask (0), so the
modes come from hekitrace, not from the test's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hekitrace.config.settings import parse_config
from hekitrace.errors import ConfigError
from hekitrace.journal import checkpoint
from hekitrace.journal.segments import Journal, scan
from hekitrace.pipeline import Pipeline
from hekitrace.service.alerts import AlertSink
from hekitrace.sim.scenarios import simulate
from hekitrace.trace.private_files import make_directories
from hekitrace.trace.writer import TraceWriter, write_events


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _journal_files(tmp_path: Path, extra: str = "") -> tuple[Path, list[str]]:
    directory = tmp_path / "var" / "lib" / "hekitrace"
    config = parse_config(f"journal:\n  directory: {directory}\n{extra}", "<test>")
    pipeline = Pipeline(config, True)
    journal = Journal(config.journal,
                      lambda seg, t: checkpoint.encode(seg, t,
                                                       checkpoint.capture_state(pipeline)),
                      say=lambda _m: None)
    journal.start(pipeline)
    for event in simulate(["clean-boot"], vms=1, seed=1):
        pipeline.feed(event)
    journal.close()
    listing = scan(str(directory))
    return directory, [p for _, p in listing.segments + listing.checkpoints]


def test_journal_segments_and_checkpoints_are_0600_in_0700_directories(tmp_path):
    directory, files = _journal_files(tmp_path)
    assert len(files) >= 3
    assert {_mode(f) for f in files} == {0o600}
    for d in (directory, directory.parent, directory.parent.parent):
        assert _mode(d) == 0o700, d


def test_journal_modes_follow_the_config(tmp_path):
    directory, files = _journal_files(tmp_path, "  file_mode: 0640\n  directory_mode: 0750\n")
    assert {_mode(f) for f in files} == {0o640}
    assert _mode(directory) == 0o750


def test_alert_file_is_created_0600_and_as_configured(tmp_path):
    config = parse_config(f"alerts:\n  stdout: false\n  file: {tmp_path / 'a.log'}\n",
                          "<test>")
    AlertSink.from_config(config.alerts).close()
    assert _mode(tmp_path / "a.log") == 0o600
    config = parse_config(f"alerts:\n  file: {tmp_path / 'b.log'}\n  file_mode: 0644\n",
                          "<test>")
    AlertSink.from_config(config.alerts).close()
    assert _mode(tmp_path / "b.log") == 0o644


def test_trace_files_are_created_0600_and_existing_ones_keep_their_mode(tmp_path):
    events = list(simulate(["clean-boot"], vms=1, seed=1))
    write_events(tmp_path / "t.htrace", events)
    write_events(tmp_path / "t.jsonl", events, encoding="jsonl")
    assert _mode(tmp_path / "t.htrace") == _mode(tmp_path / "t.jsonl") == 0o600
    existing = tmp_path / "shared.htrace"
    existing.write_bytes(b"")
    os.chmod(existing, 0o644)
    with TraceWriter(existing) as writer:
        writer.write_all(events)
    assert _mode(existing) == 0o644


def test_record_command_opens_its_output_through_the_private_writer():
    """``hekitrace record -o FILE`` writes with TraceWriter (0600 by default); it never
    opens the output itself with the umask's mode."""
    source = (Path(__file__).resolve().parents[2] / "hekitrace" / "commands" /
              "record.py").read_text()
    assert "TraceWriter(" in source and "open(args.output" not in source


def test_make_directories_sets_every_created_level(tmp_path):
    make_directories(str(tmp_path / "a" / "b" / "c"), 0o700)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


@pytest.mark.parametrize("value", ["01000", "-1", "'0600'"])
def test_bad_file_modes_are_config_errors(value):
    with pytest.raises(ConfigError, match="journal.file_mode"):
        parse_config(f"journal:\n  file_mode: {value}\n", "<test>")
