"""The repository is self-contained: no tracked file cites a document that a user who
clones it does not have (the design notes, style notes and reference pages that were kept
outside the repository), and the project docs that code cites by section exist.

Facts about Heki and KVM are cited from docs/heki-abi.md, build-host facts from
docs/kernel-support.md, principles and hooks from docs/internals.md; a kernel fact may also
cite its primary source (patch Message-ID, kernel file and version) directly.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The names are assembled so that this file does not match its own pattern.
_MD = r"\.md"
_OUTSIDE_DOCS = (
    "DESIGN" + _MD, "STYLE" + _MD, "STYLE" + " habit",
    "heki-kvm" + _MD, "build-host" + _MD, "nested-kvm-tcg" + _MD, "pvm-guest" + _MD,
    "heki-host-kernel" + _MD, "heki-guest-kernel" + _MD, "qemu-in-l1" + _MD,
    "observability" + "-anchors", "style" + "-anchors", "reference" + "/",
    # a bare section number of the outside reference, in parentheses or after a colon
    r"\(" + "reference" + r" \d|: " + "reference" + r" \d",
)
CITATION = re.compile("|".join(_OUTSIDE_DOCS))

#: "docs/<name>.md section N" or "sections N-M": the first number must be a heading
SECTION_CITE = re.compile(r"docs/([\w-]+\.md)`? sections? (\d+(?:\.\d+)?)")
DOC_CITE = re.compile(r"\bdocs/([\w-]+\.md)\b")


def find_citations(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line of ``text`` that cites an outside document."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if CITATION.search(line)]


def tracked_files(root: Path = ROOT) -> list[Path]:
    """Files under version control (``git ls-files``); the working tree without .git,
    virtual environments and caches when this is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], check=True,
                             capture_output=True, timeout=60).stdout
        return [root / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache"}
        files = []
        for base, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in skip]
            files += [Path(base) / n for n in names]
        return files


def scan(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``path:line: text`` for every citation of an outside document in ``paths``.

    Symlinks (the /proc fixtures hold dangling ones) and unreadable files are skipped;
    binary files are read as text with undecodable bytes dropped."""
    found = []
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8", errors="ignore")
        except OSError:
            continue
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        found += [f"{rel}:{n}: {line}" for n, line in find_citations(text)]
    return found


def _sections(doc: Path) -> set[str]:
    """Section numbers of a doc's numbered headings ("## 4. Page lists" -> "4")."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", doc.read_text(), re.MULTILINE))


def test_no_tracked_file_cites_an_outside_document():
    files = tracked_files()
    assert len(files) > 100, "the file list looks wrong"
    found = scan(files)
    assert not found, ("cite docs/ or the primary source instead:\n" + "\n".join(found))


@pytest.mark.parametrize("planted", [
    "see " + "DESIGN" + ".md principle 1",
    "# the host reverses the chain (" + "heki-kvm" + ".md 1.7)",
    "its generic headers (" + "reference" + "/" + "build-host" + ".md)",
    "settings as cflags (" + "STYLE" + " habit 3)",
    "the QEMU flags of " + "nested-kvm-tcg" + ".md",
    "read " + "STYLE" + ".md first",
    "compare with " + "observability" + "-anchors" + " 2",
    "return -KVM_ENOSYS (" + "reference" + " 1.5); the return",
])
def test_scanner_catches_a_planted_citation(planted, tmp_path):
    text = f"first line\n{planted}\nlast line\n"
    assert find_citations(text) == [(2, planted)]
    bad = tmp_path / "planted.py"
    bad.write_text(text)
    assert scan([bad], tmp_path) == [f"planted.py:2: {planted}"]


def test_scanner_accepts_the_projects_own_docs():
    text = ("# applied in reverse order of reading (docs/heki-abi.md section 4)\n"
            "# Source: include/uapi/linux/kvm.h (v6.12), 20231113022326.24388-12-mic@digikod.net\n"
            "# see docs/kernel-support.md section 1 and docs/internals.md, Principles\n")
    assert find_citations(text) == []


def test_cited_docs_and_sections_exist():
    """Every docs/<name>.md a tracked file names exists, and a cited section number is a
    numbered heading of that doc."""
    problems = []
    for path in tracked_files():
        if path.is_symlink() or not path.is_file() or path.suffix not in (
                ".py", ".c", ".h", ".md", ".sh", ".yaml", ".toml", ".8"):
            continue
        text = path.read_text(errors="ignore")
        for name in set(DOC_CITE.findall(text)):
            if not (ROOT / "docs" / name).is_file():
                problems.append(f"{path.relative_to(ROOT)}: docs/{name} does not exist")
        for name, number in SECTION_CITE.findall(text):
            doc = ROOT / "docs" / name
            if doc.is_file() and number not in _sections(doc):
                problems.append(f"{path.relative_to(ROOT)}: docs/{name} has no section {number}")
    assert not problems, "\n".join(problems)
