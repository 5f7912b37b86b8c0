"""The ``hekitrace`` console script: version, usage errors, and every command's --help.

Run as a real process through the installed console script (the entry point in
pyproject.toml), so a broken entry point or an import error in any subcommand fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hekitrace import __version__
from hekitrace.cli import COMMANDS
from hekitrace.commands.exit_status import USAGE as EXIT_USAGE

SCRIPT = Path(sys.executable).parent / "hekitrace"
#: subcommands that have actions of their own, each with its own --help
ACTIONS = {"config": ("validate", "show")}


def _run(*args: str) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"no console script at {SCRIPT}: run scripts/setup.sh"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "80"}, stdin=subprocess.DEVNULL)


def test_dash_dash_version():
    result = _run("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"hekitrace {__version__}")


def test_version_command():
    result = _run("version")
    assert (result.returncode, result.stdout.strip()) == (0, f"hekitrace {__version__}")


def test_unknown_command_is_a_usage_error():
    result = _run("snapshoot")
    assert result.returncode == EXIT_USAGE == 2
    assert "invalid choice: 'snapshoot'" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_command_is_a_usage_error():
    result = _run()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_top_level_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("argv", [(name, "--help") for name in COMMANDS]
                         + [(name, action, "--help") for name, actions in ACTIONS.items()
                            for action in actions])
def test_every_command_help_works(argv):
    result = _run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hekitrace " + argv[0])
    assert result.stderr == ""


def test_bad_option_of_a_command_is_a_usage_error():
    result = _run("check", "-o", "xml")
    assert result.returncode == 2
    assert "invalid choice: 'xml'" in result.stderr
