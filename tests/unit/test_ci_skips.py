"""tests/conftest.py: with CI=true every kind of skip outside the optional tiers fails.

An inner pytest runs on a tiny test tree that carries a copy of the real conftest.py, with
one file per kind of skip: at run time (``pytest.skip`` in a test, ``skipif``, a skipping
fixture) and at collection (module-level ``pytest.skip(allow_module_level=True)``,
``pytest.importorskip``), in the kernel tier, in the unit tier and in the optional soak
tier. Without CI they are skips; with CI every one but the soak tier's is a failure, and
an xfail stays an xfail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

FILES = {
    "kernel/test_runtime_skip.py": (
        "import pytest\n"
        "def test_skips_at_run_time():\n    pytest.skip('no BPF here')\n"
        "@pytest.mark.skipif(True, reason='not root')\n"
        "def test_skipif_marker():\n    pass\n"
        "@pytest.fixture\n"
        "def needs_bcc():\n    pytest.skip('bcc missing')\n"
        "def test_fixture_skip(needs_bcc):\n    pass\n"
        "@pytest.mark.xfail(strict=True, reason='known bug')\n"
        "def test_expected_failure():\n    assert False\n"
        "def test_passes():\n    pass\n"),
    "kernel/test_module_skip.py": (
        "import pytest\n"
        "pytest.skip('needs root', allow_module_level=True)\n"
        "def test_never_collected():\n    pass\n"),
    "kernel/test_importorskip.py": (
        "import pytest\n"
        "pytest.importorskip('hekitrace_no_such_module_for_this_test')\n"
        "def test_never_collected():\n    pass\n"),
    "unit/test_unit_skip.py": (
        "import pytest\n"
        "def test_unit_skip():\n    pytest.skip('groff missing')\n"),
    "soak/test_soak_skip.py": (
        "import pytest\n"
        "pytest.skip('soak: run with HEKITRACE_SOAK=1', allow_module_level=True)\n"
        "def test_soak():\n    pass\n"),
}


def _run(tmp_path: Path, ci: bool) -> tuple[int, dict[str, str], str]:
    """Run the inner pytest; returns its status, {test or module: outcome} from its JUnit
    report (passed, failed, skipped, xfail; a collection or setup error is "failed"), and
    its output."""
    tests = tmp_path / "tests"
    if not tests.exists():
        for name, text in FILES.items():
            (tests / name).parent.mkdir(parents=True, exist_ok=True)
            (tests / name).write_text(text)
        shutil.copy(CONFTEST, tests / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    report = tmp_path / f"report-{ci}.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--junitxml={report}", "tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        key = case.get("name") if case.get("classname") else case.get("name", "")
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            xfail = tags["skipped"].get("type") == "pytest.xfail"
            outcome = "xfail" if xfail else "skipped"
        else:
            outcome = "passed"
        outcomes[str(key)] = outcome
    return proc.returncode, outcomes, proc.stdout + proc.stderr


RUNTIME = ["test_skips_at_run_time", "test_skipif_marker", "test_fixture_skip",
           "test_unit_skip"]
COLLECTION = ["tests.kernel.test_module_skip", "tests.kernel.test_importorskip"]
SOAK = "tests.soak.test_soak_skip"


def test_without_ci_skips_are_skips(tmp_path):
    status, outcomes, output = _run(tmp_path, ci=False)
    assert status == 0, output
    for key in RUNTIME + COLLECTION + [SOAK]:
        assert outcomes.get(key) == "skipped", (key, outcomes)


def test_ci_fails_every_kind_of_skip_outside_the_optional_tiers(tmp_path):
    status, outcomes, output = _run(tmp_path, ci=True)
    assert status != 0, output
    for key in RUNTIME:                       # at run time: test, skipif, fixture; unit tier
        assert outcomes.get(key) == "failed", (key, outcomes)
    for key in COLLECTION:                    # at collection: module-level skip, importorskip
        assert outcomes.get(key) == "failed", (key, outcomes)
    assert "skipped in CI, which counts as a failure: Skipped: no BPF here" in output
    assert "skipped at collection in CI, which counts as a failure" in output
    assert "needs root" in output
    assert "could not import 'hekitrace_no_such_module_for_this_test'" in output


def test_ci_keeps_optional_tier_skips_xfail_and_passes(tmp_path):
    _status, outcomes, output = _run(tmp_path, ci=True)
    assert outcomes.get(SOAK) == "skipped", (outcomes, output)
    assert outcomes.get("test_expected_failure") == "xfail", outcomes
    assert outcomes.get("test_passes") == "passed", outcomes
