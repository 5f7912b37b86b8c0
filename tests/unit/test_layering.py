"""The import arrows of docs/internals.md ("Layout and the direction of imports").

Every ``import`` in every hekitrace module (including imports inside functions) is read
with ``ast`` and checked against the layer table below; no module may import another by
name at run time (``importlib``, ``__import__``), so nothing escapes the check. The
checker checks itself: a made-up package with one backward arrow of each kind must be
caught, and so must a real module of the package with a planted backward import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hekitrace"

#: layer -> the layers its modules may import (its own layer is always allowed)
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "config": {"leaf"},
    "state": {"leaf", "config", "vocabulary"},
    "vocabulary": {"leaf"},                       # state.events: what every source speaks
    "capture": {"leaf", "config", "vocabulary"},
    "trace": {"leaf", "config", "vocabulary"},
    "sim": {"leaf", "config", "vocabulary"},
    "policy": {"leaf", "config", "state", "vocabulary"},
    "journal": {"leaf", "config", "state", "vocabulary", "trace"},
    "pipeline": {"leaf", "config", "state", "vocabulary", "policy"},
    "render": {"leaf", "config", "state", "vocabulary", "policy"},
    "service": {"leaf", "config", "state", "vocabulary", "capture", "trace", "policy",
                "journal", "pipeline", "render"},
    "replay": {"leaf", "config", "state", "vocabulary", "trace", "policy", "journal",
               "pipeline", "render", "service"},
    "commands": {"leaf", "config", "state", "vocabulary", "capture", "trace", "sim",
                 "policy", "journal", "pipeline", "render", "service", "replay"},
    "cli": {"leaf", "commands"},
}

#: modules that import nothing from hekitrace but the exception tree
STRICT_LEAVES = {"", "errors", "state.events", "state.attrmap", "config.abi",
                 "config.schema", "capture.kvm_uapi", "policy.catalogue"}

#: leaves that live in a higher layer's package but every layer may read: the rule
#: catalogue sits in policy/ and the configuration validates rule ids against it
SHARED_LEAVES = {"policy.catalogue"}

#: modules every subcommand may share (subcommands never import each other)
COMMANDS_SHARED = {"commands", "commands.common", "commands.exit_status"}


def layer_of(module: str) -> str:
    """The layer of a module named relative to hekitrace ('' is the package itself)."""
    if module in ("", "errors") or module in SHARED_LEAVES:
        return "leaf"
    if module == "state.events":
        return "vocabulary"
    top = module.split(".")[0]
    if top in ALLOWED:
        return top
    raise AssertionError(f"hekitrace.{module} is in no layer: add it to test_layering.ALLOWED "
                         "and docs/internals.md")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` (dotted, without 'hekitrace.') names."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, source: str, known: set[str]) -> set[str]:
    """Every hekitrace module that ``source`` (the text of ``module``) imports."""
    tree = ast.parse(source)
    is_package = module in known and any(k.startswith(module + ".") for k in known)
    package = module if is_package else module.rpartition(".")[0]
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
            # "from hekitrace.state.events import X" imports state.events
            names = [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            if name == "hekitrace" or name.startswith("hekitrace."):
                inner = name[len("hekitrace."):] if name != "hekitrace" else ""
                found.add(_resolve(inner, known))
    found.discard(module)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    known = set(modules)
    return {m: imports_of(m, p.read_text(), known) for m, p in modules.items()}


def violations(module: str, graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``module`` that break the arrows, each with the reason."""
    layer = layer_of(module)
    bad = []
    for dep in sorted(graph[module]):
        dep_layer = layer_of(dep)
        if module in STRICT_LEAVES and dep not in ("", "errors"):
            bad.append(f"{dep} ({module} is a leaf: it imports nothing from hekitrace)")
        elif dep_layer == "cli":
            bad.append(f"{dep} (nothing imports the command line)")
        elif layer == "commands" and dep_layer == "commands" \
                and module not in COMMANDS_SHARED and dep not in COMMANDS_SHARED:
            bad.append(f"{dep} (subcommands never import each other: share through "
                       "commands.common or the library)")
        elif dep_layer != layer and dep_layer not in ALLOWED[layer]:
            bad.append(f"{dep} ({layer} must not import {dep_layer})")
    return bad


GRAPH = import_graph()


def test_the_package_is_found():
    assert {"errors", "state.events", "config.abi", "cli", "service.daemon", "replay",
            "trace.file", "policy.engine"} <= set(GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_follow_the_arrows(module):
    bad = violations(module, GRAPH)
    assert not bad, f"hekitrace.{module} must not import: {', '.join(bad)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_is_imported_by_name_at_run_time(path):
    """importlib.import_module and __import__ would hide an arrow from this test
    (importlib.resources, which reads package data, imports nothing)."""
    text = path.read_text()
    assert not re.search(r"\bimport_module\b|\b__import__\b|importlib\.util", text), path


def test_top_level_stays_small():
    """At most about ten modules directly under hekitrace/: the rest live in layers."""
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 10, sorted(top)


def test_the_rules_catch_each_kind_of_violation():
    """A made-up package with one backward arrow of each kind."""
    graph = {"": set(), "errors": set(), "state.events": set(), "config.abi": set(),
             "config.settings": {"config.abi"}, "state.host": {"state.events"},
             "policy.engine": {"state.host", "config.settings"},
             "capture.loader": {"state.host"},          # capture reads only the vocabulary
             "trace.file": {"policy.engine"},           # sources never read policy
             "service.metrics": {"commands.daemon"},    # nothing below commands imports them
             "render.documents": {"cli"},               # nobody imports cli
             "commands.vms": {"commands.snapshot"},     # subcommands never import each other
             "commands.snapshot": {"commands.common", "replay"},
             "commands.common": {"replay"}, "replay": {"policy.engine"},
             "commands.daemon": set(), "cli": {"commands.vms"},
             "state.attrmap": {"state.host"}}           # a strict leaf
    assert violations("capture.loader", graph) == ["state.host (capture must not import state)"]
    assert violations("trace.file", graph) == ["policy.engine (trace must not import policy)"]
    assert violations("service.metrics", graph) == [
        "commands.daemon (service must not import commands)"]
    assert violations("render.documents", graph) == ["cli (nothing imports the command line)"]
    assert violations("commands.vms", graph)[0].startswith("commands.snapshot (subcommands never")
    assert violations("state.attrmap", graph)[0].startswith("state.host (state.attrmap is a leaf")
    for fine in ("commands.snapshot", "commands.common", "policy.engine", "cli", "replay"):
        assert violations(fine, graph) == [], fine


def test_a_planted_backward_import_in_a_real_module_is_caught():
    """The checker on the real package, with one real module changed: state.host made to
    import the daemon's loop (a state module reading the service would run backwards)."""
    known = set(GRAPH)
    source = (PACKAGE / "state" / "host.py").read_text()
    planted = dict(GRAPH)
    planted["state.host"] = imports_of("state.host", source + "\n"
                                       "def _oops():\n    from hekitrace.service import daemon\n",
                                       known)
    assert violations("state.host", GRAPH) == []
    assert violations("state.host", planted) == [
        "service.daemon (state must not import service)"]


def test_the_checker_sees_relative_and_lazy_imports():
    """The parser itself: relative, from-package and function-level imports count."""
    known = {"state.host", "policy.engine", "capture", "capture.probe", "x", ""}
    text = ("from .state import host\nfrom .capture import probe\n"
            "def f():\n    import hekitrace.policy.engine\n")
    assert imports_of("x", text, known) == {"state.host", "policy.engine", "capture.probe"}


@pytest.mark.parametrize("codec", ["trace.binary", "trace.jsonl"])
def test_trace_codecs_never_import_the_trace_file_format(codec):
    """trace.file (header, blocks, reader, writer) imports the record codecs, never the
    other way, so a codec can be used and read on its own."""
    assert codec in GRAPH["trace.file"]
    assert "trace.file" not in GRAPH[codec], GRAPH[codec]
