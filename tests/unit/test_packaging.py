"""packaging/: the systemd unit stays hardened (systemd-analyze security --offline rates it
at most 2.0, and every check it still fails is an allowance the unit explains), and the
Debian package (packaging/debian, built by `make deb`) stays in step with the tree: what it
installs exists, it depends on Debian's packages, its patch still applies to pyproject.toml
and lets bookworm's setuptools read it, its version is hekitrace's.

Building the package takes about a minute, too slow for this tier: `make deb`
(packaging/build-deb.sh) fails on any lintian error instead."""

from __future__ import annotations

import configparser
import glob
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "hekitrace.service"
DEBIAN = ROOT / "packaging" / "debian"
MAX_EXPOSURE = 2.0

#: every check systemd-analyze security still fails -> a word the unit's comments use to
#: explain that allowance (a new failing check fails the test until it is explained here
#: and in the unit)
ALLOWANCES = {
    "SystemCallFilter=~@privileged": "bpf(2)",
    "SystemCallFilter=~@debug": "perf_event_open(2)",
    "RootDirectory=/RootImage=": "RootDirectory=",
    "AmbientCapabilities=": "ambient capabilities",
    "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)": "CAP_DAC_READ_SEARCH",
    "CapabilityBoundingSet=~CAP_BPF": "CAP_BPF",
    "CapabilityBoundingSet=~CAP_SYS_PTRACE": "CAP_SYS_PTRACE",
    "MemoryDenyWriteExecute=": "MemoryDenyWriteExecute",
    "RestrictAddressFamilies=~AF_NETLINK": "AF_NETLINK",
    "RestrictAddressFamilies=~AF_UNIX": "AF_UNIX",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "AF_INET/6",
    "ProcSubset=": "ProcSubset=",
    "PrivateNetwork=": "PrivateNetwork=",
    "PrivateUsers=": "PrivateUsers=",
    "DeviceAllow=": "device ACL",
    "IPAddressDeny=": "IPAddressAllow",
}


def _analyze(*args: str) -> str:
    assert shutil.which("systemd-analyze"), "systemd-analyze absent: scripts/setup.sh installs 'systemd'"
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", *args, str(UNIT)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _unit_comments() -> str:
    return "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))


def _service() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def _control() -> list[dict[str, str]]:
    """debian/control as paragraphs of field -> value (continuation lines joined)."""
    paragraphs = []
    for block in DEBIAN.joinpath("control").read_text().strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1].isspace() and key:
                fields[key] += "\n" + line.strip()
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        paragraphs.append(fields)
    return paragraphs


def test_unit_offline_security_exposure_is_at_most_2():
    out = _analyze()
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out


def test_every_remaining_exposure_is_an_explained_allowance():
    checks = json.loads(_analyze("--json=short"))
    failing = {c["name"] for c in checks if c.get("exposure")}
    assert failing == set(ALLOWANCES), (
        f"new: {sorted(failing - set(ALLOWANCES))}; gone: {sorted(set(ALLOWANCES) - failing)}")
    comments = _unit_comments()
    for check, word in ALLOWANCES.items():
        assert word in comments, f"{check}: the unit's comments do not explain it ({word!r})"


def test_unit_allows_ip_only_where_the_default_config_listens():
    from hekitrace.config.settings import default_config
    svc = _service()
    assert svc["IPAddressDeny"] == "any" and svc["IPAddressAllow"] == "localhost"
    host = default_config().metrics.listen.rsplit(":", 1)[0].strip("[]")
    assert host in ("127.0.0.1", "::1", "localhost"), host


def test_unit_points_bcc_at_the_packaged_bpf_sources():
    env = _service()["Environment"]
    assert "HEKITRACE_BPF_DIR=/usr/share/hekitrace/bpf" in env.split()
    install = DEBIAN.joinpath("hekitrace.install").read_text()
    assert "bpf/*.c usr/share/hekitrace/bpf/" in install
    assert "bpf/*.h usr/share/hekitrace/bpf/" in install


def test_control_depends_on_debians_packages():
    source, binary = _control()
    assert "debhelper-compat (= 13)" in source["Build-Depends"]
    for dep in ("dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools"):
        assert dep in source["Build-Depends"], dep
    assert binary["Package"] == "hekitrace" and binary["Architecture"] == "all"
    depends = {d.strip().split()[0] for d in binary["Depends"].split(",") if d.strip()}
    assert {"python3-bpfcc", "python3-pyroute2", "python3-prometheus-client",
            "python3-yaml", "${python3:Depends}", "${misc:Depends}"} <= depends
    assert "bcc" not in depends  # the unrelated PyPI name, never


def test_changelog_version_is_hekitraces():
    import hekitrace
    first = DEBIAN.joinpath("changelog").read_text().splitlines()[0]
    match = re.match(r"hekitrace \(([^)-]+)-\d+\) ", first)
    assert match, first
    assert match.group(1) == hekitrace.__version__


def test_everything_the_package_installs_exists():
    lines = []
    for name in ("hekitrace.install", "hekitrace.manpages", "hekitrace.docs",
                 "hekitrace.examples"):
        lines += [ln.split()[0] for ln in DEBIAN.joinpath(name).read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
    for pattern in lines:
        assert glob.glob(str(ROOT / pattern)), f"packaging/debian installs {pattern}: none"
    install = DEBIAN.joinpath("hekitrace.install").read_text()
    assert "packaging/systemd/hekitrace.service lib/systemd/system/" in install
    # the configuration is a conffile at the path the daemon reads by default
    from hekitrace.config.settings import DEFAULT_CONFIG_PATH
    assert "configs/hekitrace.yaml etc/hekitrace/" in install
    assert DEFAULT_CONFIG_PATH == "/etc/hekitrace/hekitrace.yaml"


def test_lintian_overrides_each_carry_a_reason():
    for path in (DEBIAN / "hekitrace.lintian-overrides", DEBIAN / "source" / "lintian-overrides"):
        previous = ""
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert previous.startswith("#"), f"{path.name}: no reason above {line!r}"
            previous = line


def test_patches_apply_to_pyproject_and_bookworm_setuptools_reads_it(tmp_path):
    """dpkg-source applies debian/patches without fuzz; after them, setuptools 66 (the
    one the package build uses, no build isolation) must accept pyproject.toml."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    series = DEBIAN.joinpath("patches", "series").read_text().split()
    for name in series:
        proc = subprocess.run(["git", "apply", "-p1", str(DEBIAN / "patches" / name)],
                              cwd=tmp_path, check=False, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"{name} no longer applies: {proc.stderr}"
    system_python = Path("/usr/bin/python3")
    if not system_python.exists():
        pytest.fail("/usr/bin/python3 absent (scripts/setup.sh needs it)")
    check = ("import sys\n"
             "from setuptools.config.pyprojecttoml import read_configuration\n"
             "meta = read_configuration(sys.argv[1], expand=False)['project']\n"
             "print(meta['name'])\n")
    proc = subprocess.run([str(system_python), "-c", check, str(tmp_path / "pyproject.toml")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "hekitrace", proc.stderr


def test_an_installed_hekitrace_finds_the_packaged_bpf_sources(tmp_path, monkeypatch):
    """Outside a checkout the BPF C comes from /usr/share/hekitrace/bpf (the package's
    place); a checkout uses its own bpf/, and $HEKITRACE_BPF_DIR overrides both."""
    from hekitrace.capture import loader

    monkeypatch.delenv(loader.BPF_DIR_ENV, raising=False)
    installed = tmp_path / "share-bpf"
    installed.mkdir()
    checkout_bpf = Path(loader.__file__).resolve().parents[2] / "bpf"
    assert loader.bpf_dir(installed) == checkout_bpf          # this test runs in a checkout
    monkeypatch.setattr(loader, "__file__", str(tmp_path / "site" / "hekitrace" / "capture"
                                                / "loader.py"))
    assert loader.bpf_dir(installed) == installed
    monkeypatch.setenv(loader.BPF_DIR_ENV, str(tmp_path / "mine"))
    assert loader.bpf_dir(installed) == tmp_path / "mine"


def test_every_python_dependency_has_its_debian_package():
    """A dependency added to pyproject.toml must be added to the package's Depends too,
    or the installed daemon fails at import time."""
    import tomllib

    debian_name = {"pyroute2": "python3-pyroute2", "prometheus-client": "python3-prometheus-client",
                   "pyyaml": "python3-yaml", "tqdm": "python3-tqdm"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    _source, binary = _control()
    depends = {d.strip().split()[0] for d in binary["Depends"].split(",") if d.strip()}
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        assert name in debian_name, f"{name}: which Debian package provides it?"
        assert debian_name[name] in depends, f"{debian_name[name]} missing from Depends"
