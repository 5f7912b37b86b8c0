"""hekitrace.config.schema: the schema-free YAML-to-dataclass machinery behind config."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hekitrace.config.schema import (
    FrozenMap,
    NodeWalker,
    apply_override,
    compose,
    locate,
    one_of,
    plain,
    positive,
    setting,
    subsection,
)
from hekitrace.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    size: int = setting(4, int, positive)
    mode: str = setting("a", str, one_of("a", "b"))


@dataclass(frozen=True)
class Outer:
    ratio: float = setting(1.0, float)
    name: str | None = setting(None, str, None, True)
    inner: Inner = subsection(Inner)


def _read(text: str, *overrides: str) -> Outer:
    root = compose(text, "t.yaml")
    for override in overrides:
        root = apply_override(root, override)
    return NodeWalker("t.yaml").section(root, Outer, "")


def test_section_reads_values_and_keeps_defaults():
    got = _read("ratio: 2\ninner:\n  mode: b\n")
    assert got == Outer(ratio=2.0, inner=Inner(size=4, mode="b"))
    assert isinstance(got.ratio, float)


def test_empty_document_gives_the_defaults():
    assert _read("") == Outer()
    assert _read("~\n") == Outer()


@pytest.mark.parametrize("text, line, key, reason", [
    ("ratio: 1\ninner:\n  sise: 3\n", 3, "inner.sise", "did you mean 'size'?"),
    ("inner:\n  size: 0\n", 2, "inner.size", "expected a number greater than 0, got 0"),
    ("inner:\n  size: true\n", 2, "inner.size", "expected an integer, got a boolean"),
    ("ratio: .nan\n", 1, "ratio", "expected a finite number"),
    ("inner: [1]\n", 1, "inner", "expected a mapping, got a list"),
    ("ratio: 1\nratio: 2\n", 2, "ratio", "duplicate key (first set on line 1)"),
])
def test_errors_name_line_key_and_expectation(text, line, key, reason):
    with pytest.raises(ConfigError) as info:
        _read(text)
    assert (info.value.path, info.value.line, info.value.key) == ("t.yaml", line, key)
    assert reason in info.value.reason


def test_syntax_error_carries_its_line():
    with pytest.raises(ConfigError) as info:
        compose("a: 1\nb: [\n", "t.yaml")
    assert info.value.line is not None and "not valid YAML" in info.value.reason


def test_override_sets_nested_keys_and_errors_name_it():
    assert _read("inner:\n  size: 2\n", "inner.mode=b").inner == Inner(2, "b")
    assert _read("", "inner.size=9").inner.size == 9
    with pytest.raises(ConfigError) as info:
        _read("", "inner.size=-1")
    assert info.value.line is None and "(from -O inner.size=-1)" in info.value.reason
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        _read("", "inner.size")


def test_locate_finds_key_nodes():
    root = compose("a:\n  b: 1\n", "t.yaml")
    node = locate(root, "a", "b")
    assert node is not None and node.start_mark.line == 1
    assert locate(root, "a", "c") is None and locate(root, "a", "b", "c") is None


def test_frozen_map_is_read_only_and_plain_unwraps():
    frozen = FrozenMap({"x": 1})
    with pytest.raises(TypeError):
        frozen["y"] = 2
    assert plain(Outer(inner=Inner(3))) == {"ratio": 1.0, "name": None,
                                            "inner": {"size": 3, "mode": "a"}}
