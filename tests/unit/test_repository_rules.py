"""Rules of the repository's shape that no other test sees.

- Tests import helpers by name (the ``tests`` package): no test file changes ``sys.path``
  (``sys.path.insert``, ``append`` or ``extend``), in its own code or in a child script it
  keeps in a string.
- No test imports from bench/: what a test needs from a benchmark lives in hekitrace or in
  a test helper.
- No ``.py`` file under hekitrace/ is over :data:`MAX_LINES` lines unless one of its first
  five lines is ``# size: <reason>``.
- At most :data:`MAX_TOP_MODULES` ``.py`` files directly under hekitrace/.

Each scanner is a function of text or of a directory, and each is run on a planted sample
too, so that a rule which could never fail is caught.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
PACKAGE = REPO / "hekitrace"
BENCH = REPO / "bench"

MAX_LINES = 500
MAX_TOP_MODULES = 10
SIZE_REASON = re.compile(r"^# size: \S")

#: files over MAX_LINES whose split is under way in another branch; emptied when it lands
#: (the test below fails once an entry is no longer over the limit, so it cannot go stale)
PENDING: set[str] = set()

#: functions that load a module by name or by path
_LOADERS = {"import_module", "__import__", "run_path", "run_module",
            "spec_from_file_location", "SourceFileLoader"}


def _trees(source: str):
    """The module's tree, then the tree of every string in it that is itself a Python
    program (a child script run with ``python -c``), recursively."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and "\n" in node.value:
            yield from _trees(node.value)


def path_changes(source: str) -> list[str]:
    """Each ``sys.path.insert/append/extend(...)`` call in ``source`` or its child scripts."""
    found = []
    for tree in _trees(source):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("insert", "append", "extend") \
                    and ast.unparse(node.func.value) == "sys.path":
                found.append(ast.unparse(node))
    return found


def bench_imports(source: str, bench_modules: set[str]) -> list[str]:
    """Each import in ``source`` (or its child scripts) of ``bench`` or of one of the
    ``bench_modules`` (the stems of bench/*.py), and each loader call naming bench."""
    found = []
    for tree in _trees(source):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else \
                    func.id if isinstance(func, ast.Name) else ""
                if name in _LOADERS and "bench" in ast.unparse(node):
                    found.append(ast.unparse(node))
            for name in names:
                top = name.split(".")[0]
                if top == "bench" or top in bench_modules:
                    found.append(name)
    return found


def oversized(root: Path) -> dict[str, int]:
    """``.py`` files under ``root`` over MAX_LINES lines without a ``# size:`` reason in
    their first five lines: path relative to root's parent -> line count."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(SIZE_REASON.match(li) for li in lines[:5]):
            out[path.relative_to(root.parent).as_posix()] = len(lines)
    return out


def top_modules(root: Path) -> list[str]:
    """The ``.py`` files directly under ``root``."""
    return sorted(p.name for p in root.glob("*.py"))


def _test_files() -> list[Path]:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50, files   # the walk found the suite
    return files


# -- the repository ------------------------------------------------------------------------

def test_no_test_file_changes_sys_path():
    bad = {f.relative_to(REPO).as_posix(): calls for f in _test_files()
           if (calls := path_changes(f.read_text()))}
    assert not bad, f"import helpers from the tests package instead: {bad}"


def test_no_test_imports_bench():
    bench_modules = {p.stem for p in BENCH.glob("*.py")}
    assert "bench_consumer" in bench_modules, bench_modules
    bad = {f.relative_to(REPO).as_posix(): names for f in _test_files()
           if (names := bench_imports(f.read_text(), bench_modules))}
    assert not bad, f"move what the test needs into hekitrace or a test helper: {bad}"


def test_no_module_over_the_size_limit_without_a_reason():
    big = oversized(PACKAGE)
    assert set(big) - PENDING == set(), \
        f"over {MAX_LINES} lines: split, or write '# size: <reason>' in the first 5 lines: " \
        f"{ {k: v for k, v in big.items() if k not in PENDING} }"
    done = PENDING - set(big)
    assert not done, f"no longer over the limit: remove from PENDING: {done}"


def test_few_modules_at_the_top_of_the_package():
    names = top_modules(PACKAGE)
    assert "cli.py" in names, names
    assert len(names) <= MAX_TOP_MODULES, names


# -- the scanners catch planted samples ----------------------------------------------------
# The samples are put together from pieces so that this file's own strings are not code
# that breaks the rules (the scan above reads this file too).

_SYS_PATH = "sys.path"


def test_path_change_scanner_catches_planted_calls():
    direct = f"import sys\n{_SYS_PATH}.insert(0, '/x')\nimport vmm\n"
    appended = f"import sys\nif True:\n    {_SYS_PATH}.append('/x')\n"
    child = f'import subprocess\nCHILD = """\nimport sys\n{_SYS_PATH}.insert(0, sys.argv[1])\n"""\n'
    assert path_changes(direct) == ["sys.path.insert(0, '/x')"]
    assert path_changes(appended) == ["sys.path.append('/x')"]
    assert path_changes(child) == ["sys.path.insert(0, sys.argv[1])"]
    assert path_changes("import sys\nprint(sys.path)\nparts = [1]\nparts.insert(0, 2)\n") == []


def test_bench_import_scanner_catches_planted_imports():
    mods = {"bench_consumer"}
    bench = "bench"
    assert bench_imports(f"from {bench}_consumer import xdp_test_run\n", mods) == \
        ["bench_consumer"]
    assert bench_imports(f"import {bench}.bench_consumer as b\n", mods) == ["bench.bench_consumer"]
    assert bench_imports(f'C = """\nimport {bench}_consumer\n"""\n', mods) == ["bench_consumer"]
    loaded = bench_imports(
        f"import runpy\nrunpy.run_path('{bench}/bench_consumer.py')\n", mods)
    assert loaded == ["runpy.run_path('bench/bench_consumer.py')"]
    assert bench_imports("from hekitrace.capture.testrun import run_xdp\n"
                         "GEN = 'bench/gen_ringbuf.c'\n", mods) == []


def test_size_scanner_catches_a_planted_long_module(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    body = "x = 1\n" * MAX_LINES
    (pkg / "at_limit.py").write_text(body)
    (pkg / "sub" / "long.py").write_text(body + "y = 2\n")
    (pkg / "reasoned.py").write_text('"""Doc."""\n\n# size: one hot structure\n' + body)
    (pkg / "late_reason.py").write_text("\n" * 5 + "# size: too late\n" + body)
    (pkg / "empty_reason.py").write_text("# size: \n" + body)
    assert oversized(pkg) == {"pkg/sub/long.py": MAX_LINES + 1,
                              "pkg/late_reason.py": MAX_LINES + 6,
                              "pkg/empty_reason.py": MAX_LINES + 1}


def test_top_module_count_sees_a_planted_crowd(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    for i in range(MAX_TOP_MODULES + 1):
        (tmp_path / f"m{i}.py").write_text("")
    names = top_modules(tmp_path)
    assert len(names) == MAX_TOP_MODULES + 1 > MAX_TOP_MODULES
    assert "deep.py" not in names and "notes.txt" not in names
