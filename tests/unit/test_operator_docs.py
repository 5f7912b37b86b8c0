"""The operator kit stays in step with the code: the man page renders and has its
sections, every rule id is documented (docs/findings.md) and every alerted rule has a
runbook entry, every documented metric is in docs/metrics.md, and packaging/install.sh
lays out the files docs/install.md promises."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hekitrace.policy import catalogue

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "man" / "hekitrace.8"
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXAMPLES", "FILES",
            "EXIT STATUS", "OVERHEAD", "CAVEATS", "SEE ALSO")


def test_man_page_has_every_section_in_order():
    text = MAN.read_text()
    found = [m.strip('"') for m in re.findall(r"^\.SH (.+)$", text, re.MULTILINE)]
    assert found == list(SECTIONS)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff missing (Debian: groff-base)")
def test_man_page_renders_without_warnings():
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    shown = subprocess.run(["groff", "-man", "-Tascii", str(MAN)], check=False, capture_output=True,
                           text=True, timeout=60).stdout
    assert "hekitrace snapshot web1 --diff web1.baseline.json" in re.sub(r".\x08", "", shown)


def test_man_page_exit_statuses_match_cli():
    from hekitrace.commands import exit_status

    text = MAN.read_text().split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    codes = {int(c) for c in re.findall(r"^\.B (\d+)$", text, re.MULTILINE)}
    assert codes == set(exit_status.ALL)


def _bpf_cost_cases() -> dict[str, int]:
    """bench/results.json's BPF cost of every case (ns per run, rounded), as make bench
    measured them: the figures BENCHMARKS.md and the man page quote."""
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    storm = next(e for e in results["entries"] if e["name"] == "bpf_fault_storm")
    return {case: round(ns) for case, ns in storm["details"]["all_cases_ns"].items()}


#: each OVERHEAD sentence's case -> the results.json case it must quote
_OVERHEAD_CASES = {
    "an empty program costing": "empty",
    "the fault hook drops (read access) costs": "read",
    "on an unprotected page": "unprotected_page",
    "on one 2 MiB region (": "cold_bucket",
    "inside a storm": "storm",
    "A CR4 write costs": "cr: CR4 write (record sent)",
    "a filtered CR3 write": "cr: CR3 write (filtered)",
    "a non-Heki hypercall": "hypercall: other nr (telemetry record)",
    "200-entry page list": "hypercall: PROTECT_MEMORY, 2-page list, 200 entries",
}


def test_man_page_overhead_cites_benchmarks():
    """Each ns figure of the OVERHEAD section is bench/results.json's figure for the case
    the sentence names (not just some number found somewhere), and no ns figure goes
    unchecked."""
    overhead = MAN.read_text().split(".SH OVERHEAD", 1)[1].split(".SH", 1)[0]
    rows = _bpf_cost_cases()
    checked = set()
    for phrase, row in _OVERHEAD_CASES.items():
        assert row in rows, f"bench/results.json has no case {row!r}"
        at = overhead.find(phrase)
        assert at >= 0, f"OVERHEAD no longer says {phrase!r}"
        # the figure of a case is the first "N ns" after its phrase
        m = re.compile(r"\b(\d+) ns\b").search(overhead, at + len(phrase))
        assert m is not None, f"no ns figure after {phrase!r}"
        assert int(m.group(1)) == rows[row], \
            f"OVERHEAD says {m.group(0)} for {row!r}; bench/results.json says {rows[row]}"
        checked.add(m.start())
    every = {m.start() for m in re.finditer(r"\b(\d+) ns\b", overhead)}
    assert every == checked, "an ns figure in OVERHEAD is not tied to a results.json case"


def test_every_rule_id_is_documented():
    text = (ROOT / "docs" / "findings.md").read_text()
    headings = " ".join(re.findall(r"^###? (.+)$", text, re.MULTILINE))
    for rule in catalogue.RULE_IDS:
        if re.search(rf"\b{rule}\b", headings):
            continue
        # rules hekitrace cannot evaluate are documented in the rule table, saying so
        row = re.search(rf"^\|\s*`{rule}`.*$", text, re.MULTILINE)
        assert row and "not evaluated" in row.group(0), \
            f"docs/findings.md has no section for rule {rule}"


def test_the_rule_table_is_the_catalogue():
    """docs/findings.md's rule table lists every rule of the catalogue once, each with its
    default severity and its one-line meaning ('-' and **not evaluated** for the rules
    hekitrace does not evaluate)."""
    text = (ROOT / "docs" / "findings.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z-]+) \| (.+) \|$", text, re.MULTILINE)
    assert sorted(r[0] for r in rows) == sorted(catalogue.RULE_IDS)
    by_id = {entry.id: entry for entry in catalogue.RULES}
    for rule, severity, fires_when in rows:
        entry = by_id[rule]
        if entry.not_evaluated:
            assert (severity, fires_when) == ("-", f"**not evaluated**: {entry.fires_when}"), rule
        else:
            assert (severity, fires_when) == (entry.severity, entry.fires_when), rule


def test_every_alerted_rule_has_a_runbook_entry():
    rules = yaml.safe_load((ROOT / "packaging/prometheus/hekitrace-alerts.yml").read_text())
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    alerted: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            for alt in re.findall(r'rule=~"([^"]+)"', rule["expr"]):
                alerted |= set(alt.split("|"))
    assert alerted, "no rule-specific alerts found"
    assert alerted <= set(catalogue.RULE_IDS), alerted - set(catalogue.RULE_IDS)
    for rule in alerted:
        assert f"`{rule}`" in runbook, f"docs/runbook.md does not mention {rule}"


def test_every_documented_metric_is_in_the_metrics_reference():
    internals = (ROOT / "docs" / "internals.md").read_text()
    section = internals.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"\b(hekitrace_[a-z_]+)", section))
    reference = (ROOT / "docs" / "metrics.md").read_text()
    missing = sorted(n for n in names if n not in reference)
    assert not missing, f"docs/metrics.md lacks {missing}"


def test_install_sh_stages_the_documented_layout(tmp_path):
    result = subprocess.run([str(ROOT / "packaging" / "install.sh"), "--root", str(tmp_path),
                             "--no-packages", "--no-python"], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for rel in ("etc/hekitrace/hekitrace.yaml", "etc/systemd/system/hekitrace.service",
                "etc/systemd/system/hekitrace.service.d/install.conf",
                "usr/share/hekitrace/bpf/hekitrace.h",
                "usr/share/hekitrace/prometheus/hekitrace-alerts.yml",
                "usr/share/hekitrace/grafana/hekitrace.json",
                "usr/local/share/man/man8/hekitrace.8", "usr/share/doc/hekitrace/runbook.md"):
        assert (tmp_path / rel).is_file(), rel
    assert (tmp_path / "var/lib/hekitrace").stat().st_mode & 0o777 == 0o700
    dropin = (tmp_path / "etc/systemd/system/hekitrace.service.d/install.conf").read_text()
    assert "HEKITRACE_BPF_DIR=/usr/share/hekitrace/bpf" in dropin
    # a second run keeps an edited configuration
    (tmp_path / "etc/hekitrace/hekitrace.yaml").write_text("# mine\n")
    subprocess.run([str(ROOT / "packaging" / "install.sh"), "--root", str(tmp_path),
                    "--no-packages", "--no-python"], check=True, capture_output=True)
    assert (tmp_path / "etc/hekitrace/hekitrace.yaml").read_text() == "# mine\n"
    assert (tmp_path / "etc/hekitrace/hekitrace.yaml.dist").is_file()
    install_md = (ROOT / "docs" / "install.md").read_text()
    for rel in ("/etc/hekitrace/hekitrace.yaml", "/var/lib/hekitrace", "hekitrace check",
                "localhost:9864/metrics", "CAP_BPF", "linux-headers"):
        assert rel in install_md, rel
