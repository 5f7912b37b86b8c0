"""Fuzz the configuration loader: random YAML documents and mutations of the default.

Operators edit configs by hand and tools template them; a bad one must stop the daemon
(or ``hekitrace check``) with a ConfigError naming the file and, where there is one, the
line, never another exception. Inputs: the bundled configs/hekitrace.yaml with flipped
bytes, deleted/duplicated lines and replaced scalar values (values drawn from every YAML
type, including ones no key expects), random YAML documents, and ``-O`` overrides with
random keys and values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from hekitrace.config.settings import Config, default_config, parse_config
from hekitrace.errors import ConfigError
from tests.fuzz.fuzzbudget import bounded, budget

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = (ROOT / "configs" / "hekitrace.yaml").read_text()
LINES = DEFAULT.splitlines()

SCALARS = st.sampled_from(["", "~", "null", "true", "no", "0", "-1", "0x10", "1e400", "nan",
                           "-.inf", "2**64", "18446744073709551616", "[]", "{}", "[1, [2]]",
                           "{a: b}", "'quoted'", "\"\\x00\"", "&a 1", "*a", "!!binary AA==",
                           "!!python/object:os.system ls", "2026-11-25", "/abs/path",
                           "rel/path", "::1", "[::1]:0", ":99999", "9864", "|\n  block"])


def check(text: str, overrides: tuple[str, ...] = ()) -> None:
    try:
        config = parse_config(text, "fuzz.yaml", overrides)
    except ConfigError as error:
        assert str(error)
        return
    assert isinstance(config, Config)
    config.abi_profile()      # a config that loads must also yield an ABI profile


@st.composite
def mutated_default(draw) -> str:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "delete", "dup", "indent", "chars"]))
        line = lines[i]
        if op == "value" and ":" in line:
            key = line.split(":", 1)[0]
            lines[i] = f"{key}: {draw(SCALARS)}"
        elif op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 6)) + line.lstrip()
        else:
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(st.text(max_size=4)) + line[at:]
        if not lines:
            break
    return "\n".join(lines) + "\n"


@given(mutated_default())
@budget(300)
@bounded(seconds=10.0, megabytes=32)
def test_mutated_default_config_is_valid_or_a_config_error(text):
    check(text)


YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["abi", "hooks", "capture", "state", "policy", "alerts", "metrics",
                         "control", "journal", "daemon", "rules", "exceptions", "listen",
                         "max_list_pages", "hypercalls", "guest_bits", "vms", "name"])
        | st.text(max_size=6), inner, max_size=5),
    max_leaves=20)


@given(YAMLISH)
@budget(300)
@bounded(seconds=10.0, megabytes=32)
def test_random_yaml_document_is_valid_or_a_config_error(doc):
    check(yaml.safe_dump(doc))


def _empty_document(text: str) -> bool:
    """True when ``text`` is a YAML document with nothing in it (blank, comments, ``~``,
    ``{}``): the one valid config random bytes can make, documented as the defaults."""
    try:
        return yaml.safe_load(text) in (None, {})
    except (yaml.YAMLError, RecursionError):
        return False


@given(st.binary(max_size=200))
@example(b"")
@example(b"# just a comment\n")
@budget(200)
@bounded(seconds=10.0, megabytes=32)
def test_random_bytes_are_a_config_error(data):
    """Random bytes are never a configuration: ConfigError with a message, except the
    empty document, which must give exactly the defaults (not some other valid config)."""
    text = data.decode("utf-8", "replace")
    if _empty_document(text):
        assert parse_config(text, "fuzz.yaml") == default_config()
        return
    with pytest.raises(ConfigError) as info:
        parse_config(text, "fuzz.yaml")
    assert str(info.value).startswith("fuzz.yaml")


@given(st.lists(st.tuples(st.text(max_size=30), SCALARS), max_size=3))
@budget(200)
@bounded(seconds=10.0, megabytes=32)
def test_random_overrides_are_valid_or_a_config_error(pairs):
    check(DEFAULT, tuple(f"{k}={v}" for k, v in pairs))


@pytest.mark.parametrize("text", [
    "capture: {max_list_pages: 1e400}\n",
    "policy:\n  rules:\n    wx_request: [1, 2]\n",
    "abi: !!python/object:os.system ls\n",
    "a: &a [*a]\n",
    "metrics: {listen: \"[::1\"}\n",
    "\ufeff\x00",
    "- " * 10_000 + "1\n",
    "[" * 100_000 + "\n",
    "capture: {queue_events: " + str(10**33) + "}\n",
])
def test_hostile_config_through_check_cli_is_an_error_line(text, tmp_path):
    """Each of these is invalid: `config validate` exits 3 (EXIT_CONFIG) with exactly one
    error line naming the file, never 0 and never a traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "hekitrace.cli", "config", "validate",
                           str(path)], capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr


@given(depth=st.integers(1, 20_000), kind=st.sampled_from(["- ", "[", "{a: ", "a:\n  "]))
@budget(30)
@bounded(seconds=10.0, megabytes=32)
def test_deep_yaml_is_a_config_error_naming_the_nesting(depth, kind):
    if kind == "a:\n  ":
        text = "".join("  " * i + "a:\n" for i in range(min(depth, 2000)))
        depth = min(depth, 2000)
    else:
        text = kind * depth + "1\n"
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as error:
        if depth > 32:
            assert "nested more than 32 levels" in str(error) or "not valid YAML" in str(error)
        return


def test_regression_control_character_is_a_config_error_not_a_reader_error(tmp_path):
    """Found by test_mutated_default_config_is_valid_or_a_config_error: PyYAML's loader
    constructor rejects non-printable characters with ReaderError before parsing began,
    outside parse_config's try (was a traceback from ``hekitrace config validate``)."""
    with pytest.raises(ConfigError, match="not valid YAML.*#x0008"):
        parse_config("\x08" + DEFAULT, "fuzz.yaml")
    (tmp_path / "c.yaml").write_text("\x08a: 1\n")
    proc = subprocess.run([sys.executable, "-m", "hekitrace.cli", "config", "validate",
                           str(tmp_path / "c.yaml")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
