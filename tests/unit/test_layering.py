"""The import arrows of docs/internals.md ("Modules and the direction of imports").

Every ``import`` in every hekitrace module (including imports inside functions) is read
with ``ast`` and checked against the layer table below. Modules that do not exist yet are
simply not checked. A module the table does not name counts as a leaf when everything it
imports from hekitrace is a leaf (e.g. a new module of kernel constants); otherwise only
the global rules apply to it: nothing imports the wiring (daemon, pipeline, commands, cli),
and nothing below the wiring imports it either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hekitrace"

#: the contract's leaves: import nothing from hekitrace (changes may import events)
LEAVES = {"errors", "events", "abi", "attrmap", "changes", ""}   # "" = hekitrace/__init__
LEAF_EXCEPTIONS = {"changes": {"events"}}
SOURCES = {"trace", "tracecodec", "tracejson", "sim"}
SINKS = {"metrics", "alerts", "control", "journal"}
WIRING = {"daemon", "pipeline", "cli", "__main__"}

#: group -> groups it may import
ALLOWED = {
    "leaf": {"leaf"},
    "config": {"leaf"},
    "capture": {"leaf", "config", "capture"},
    "source": {"leaf", "source"},
    "host": {"leaf"},
    "policy": {"leaf", "config", "host"},
    "views": {"leaf", "host", "policy"},
    "sink": {"leaf", "config", "host", "policy", "views", "source", "sink"},
    "wiring": {"leaf", "config", "capture", "source", "host", "policy", "views", "sink",
               "wiring", "other"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` (dotted, without 'hekitrace.') names."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(["hekitrace", *base])
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            # "from hekitrace.capture import probe" imports the module capture.probe;
            # "from hekitrace.abi import X" imports abi (the longest known prefix)
            names = [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            if name == "hekitrace" or name.startswith("hekitrace."):
                inner = name[len("hekitrace."):] if name != "hekitrace" else ""
                found.add(_resolve(inner, known))
    found.discard(module)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def _group(module: str, graph: dict[str, set[str]], leaves: set[str]) -> str:
    top = module.split(".")[0]
    if module in leaves:
        return "leaf"
    if module == "config":
        return "config"
    if top == "capture":
        return "capture"
    if module in SOURCES:
        return "source"
    if module in ("host", "policy", "views"):
        return module
    if module in SINKS:
        return "sink"
    if module in WIRING or top == "commands":
        return "wiring"
    return "other"


def _leaves(graph: dict[str, set[str]]) -> set[str]:
    """The contract's leaves plus unnamed modules that only import leaves."""
    leaves = {m for m in graph if m in LEAVES}
    named = LEAVES | SOURCES | SINKS | WIRING | {"config", "host", "policy", "views"}
    changed = True
    while changed:
        changed = False
        for module, deps in graph.items():
            top = module.split(".")[0]
            if module in leaves or module in named or top in ("capture", "commands"):
                continue
            if deps <= leaves:
                leaves.add(module)
                changed = True
    return leaves


GRAPH = _import_graph()


def test_the_package_is_found():
    assert {"errors", "events", "abi", "cli"} <= set(GRAPH)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m in LEAVES))
def test_contract_leaves_import_nothing_from_hekitrace(module):
    allowed = LEAF_EXCEPTIONS.get(module, set()) | {""}
    assert GRAPH[module] <= allowed, f"{module} imports {sorted(GRAPH[module] - allowed)}"


def _violations(module: str, graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``module`` that break the arrows, each with the reason."""
    leaves = _leaves(graph)
    group = _group(module, graph, leaves)
    bad = []
    for dep in sorted(graph[module]):
        dep_group = _group(dep, graph, leaves)
        if dep == "cli" or (dep_group == "wiring" and group != "wiring"):
            bad.append(f"{dep} (wiring: nothing below it imports it)")
        elif group == "other":
            continue      # not named by the contract: only the global rules apply
        elif dep_group not in ALLOWED[group]:
            bad.append(f"{dep} ({dep_group})")
    return bad


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_follow_the_arrows(module):
    bad = _violations(module, GRAPH)
    assert not bad, f"{module} must not import: {', '.join(bad)}"


def test_the_rules_catch_each_kind_of_violation():
    """A made-up package with one wrong arrow of each kind."""
    graph = {"": set(), "errors": set(), "events": set(), "abi": set(), "config": {"abi"},
             "host": {"events"}, "policy": {"host", "config"}, "daemon": {"policy"},
             "cli": set(), "pipeline": set(),
             "capture.loader": {"host"},          # capture must not read state
             "trace": {"policy"},                 # nor may trace
             "metrics": {"daemon"},               # sinks never import the wiring
             "views": {"cli"},                    # nobody imports cli
             "consts": set(), "helper": {"consts", "errors"},   # derived leaves
             "sim": {"helper"},                   # fine: helper only uses leaves
             "odd": {"policy"}, "capture.x": {"odd"}}           # odd is no leaf
    assert _violations("capture.loader", graph) == ["host (host)"]
    assert _violations("trace", graph) == ["policy (policy)"]
    assert _violations("metrics", graph) == ["daemon (wiring: nothing below it imports it)"]
    assert _violations("views", graph) == ["cli (wiring: nothing below it imports it)"]
    assert _violations("sim", graph) == []
    assert _violations("capture.x", graph) == ["odd (other)"]
    assert _violations("daemon", graph) == [] and _violations("policy", graph) == []


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    """The parser itself: relative, from-package and function-level imports count."""
    src = tmp_path / "x.py"
    src.write_text("from . import host\nfrom .capture import probe\n"
                   "def f():\n    import hekitrace.policy\n")
    known = {"host", "policy", "capture", "capture.probe", "x", ""}
    assert _imports("x", src, known) == {"host", "policy", "capture.probe"}


@pytest.mark.parametrize("module", ["yamlschema", "simpages", "simvm"])
def test_split_out_helpers_stay_leaves(module):
    """Helpers split out of a layer (config's YAML machinery) import only leaves, so any
    layer may use them; if one starts importing a layer it must be placed in the table."""
    assert module in GRAPH and module in _leaves(GRAPH), GRAPH.get(module)


@pytest.mark.parametrize("codec", ["tracecodec", "tracejson"])
def test_trace_codecs_never_import_the_trace_file_format(codec):
    """The arrow between sources: ``trace`` (header, blocks, reader, writer) imports the
    record codecs, never the other way, so a codec can be used and read on its own."""
    assert codec in GRAPH and "trace" in GRAPH and codec in GRAPH["trace"]
    assert "trace" not in GRAPH[codec], GRAPH[codec]
