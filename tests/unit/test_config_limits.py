"""Issue 19: config validation knows every limit the daemon and the kernel impose.

Each impossible value is rejected with one line naming the file, the line, the key, the
allowed range and why (hekitrace/config/limits.py); hostile YAML (deep nesting, a huge
file, /dev/zero) is one error line too, in bounded memory and time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hekitrace.capture import loader
from hekitrace.config import limits
from hekitrace.config.settings import default_config, parse_config
from hekitrace.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HEKITRACE = [sys.executable, "-m", "hekitrace.cli"]


def _validate(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["prlimit", "--as=536870912", *HEKITRACE, "config", "validate", path],
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


@pytest.mark.parametrize("text,key,shown", [
    ("capture:\n  max_list_pages: 100000000000\n", "capture.max_list_pages", "1..24"),
    ("capture:\n  max_list_pages: 25\n", "capture.max_list_pages", "verifier"),
    ("capture:\n  queue_events: 1e33\n", "capture.queue_events",
     "expected an integer, got a string '1e33'; allowed: 1..4194304"),
    ("capture:\n  queue_events: " + str(10**33) + "\n", "capture.queue_events", "1..4194304"),
    ("capture:\n  control_ring_bytes: " + str(2**60) + "\n", "capture.control_ring_bytes",
     "a power of two in 4096..2147483648"),
    ("capture:\n  telemetry_ring_bytes: 12288\n", "capture.telemetry_ring_bytes",
     "power of two"),
    ("daemon:\n  status_interval_seconds: 1.0e+300\n", "daemon.status_interval_seconds",
     "epoll_wait"),
    ("journal:\n  retention_seconds: 1.0e+12\n", "journal.retention_seconds", "ten years"),
    ("journal:\n  segment_bytes: " + str(2**50) + "\n  max_bytes: " + str(2**51) + "\n",
     "journal.segment_bytes", "1 TiB"),
    ("state:\n  max_entries_per_request: 99999999\n", "state.max_entries_per_request",
     "1..65536"),
    ("metrics:\n  listen: 127.0.0.1:65536\n", "metrics.listen", "0-65535"),
])
def test_impossible_values_are_one_line_with_file_line_key_range(tmp_path, text, key, shown):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(text, str(path))
    assert info.value.key == key and info.value.line == 2
    proc = _validate(str(path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert f"{path}:2: {key}: expected" in lines[0] and shown in lines[0], lines[0]


def test_limits_match_the_daemon_and_the_defaults_are_within_them():
    assert limits.VERIFIER_MAX_LIST_PAGES == loader.MAX_LIST_PAGES_LIMIT
    parse_config(f"capture:\n  max_list_pages: {limits.VERIFIER_MAX_LIST_PAGES}\n")
    parse_config("capture:\n  control_ring_bytes: 2147483648\n")
    config = default_config()
    for key, bound in limits.SETTING_BOUNDS.items():
        section, *rest = key.split(".")
        value = getattr(config, section)
        for part in rest:
            value = getattr(value, part)
        assert bound.problem(value) is None, (key, value)


@pytest.mark.parametrize("doc,shown", [
    ("- " * 10_000 + "1\n", "nested more than 32 levels"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 levels"),
    ("{a: " * 50_000 + "1" + "}" * 50_000 + "\n", "nested more than 32 levels"),
])
def test_deep_yaml_is_one_line_naming_the_nesting(tmp_path, doc, shown):
    path = tmp_path / "deep.yaml"
    path.write_text(doc)
    started = time.monotonic()
    proc = _validate(str(path))
    assert time.monotonic() - started < 10
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert shown in lines[0] and str(path) in lines[0]


def test_deep_override_value_is_a_config_error():
    with pytest.raises(ConfigError, match="nested more than"):
        parse_config("", "c.yaml", ("capture.vendor=" + "[" * 5000,))


@pytest.mark.parametrize("source", ["/dev/zero", "sparse"])
def test_huge_config_is_refused_before_parsing(tmp_path, source):
    if source == "sparse":
        path = tmp_path / "sparse.yaml"
        with open(path, "wb") as fh:
            fh.truncate(2 << 30)
        source = str(path)
    started = time.monotonic()
    proc = _validate(source)
    assert time.monotonic() - started < 10
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert f"larger than {limits.MAX_CONFIG_BYTES} bytes" in lines[0]
