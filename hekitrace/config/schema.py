"""Read a YAML node tree into frozen dataclasses, every error carrying its line and key.

Why a node tree and not ``yaml.safe_load``: a loaded dict has forgotten where each value
was written, and an operator needs "hekitrace.yaml:12: policy.rules.wx_request: expected
...". PyYAML's ``compose`` keeps a mark on every node, so :class:`NodeWalker` validates the
tree against the dataclasses' field metadata (type, check, nullable) and raises
ConfigError at the first problem, with "did you mean ..." for a misspelt key.

This is the machinery only; the schema (sections, keys, defaults, cross-field rules) is
``hekitrace.config.settings``. A schema declares a field with :func:`setting` (a scalar) or
:func:`subsection` (a nested dataclass); other ``kind`` values are the schema's own and
are handled by a :class:`NodeWalker` subclass overriding :meth:`NodeWalker.value`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from hekitrace.errors import ConfigError

#: a value check: None when the value is fine, else what was expected ("a number > 0")
Check = Callable[[Any], "str | None"]

_MAP_TAG = "tag:yaml.org,2002:map"
_STR_TAG = "tag:yaml.org,2002:str"


class FrozenMap(dict):
    """A read-only dict: the frozen config's mappings (rule settings).

    A dict subclass rather than ``types.MappingProxyType`` so that ``dataclasses.asdict``,
    ``copy.deepcopy``, pickling and hashing of a Config keep working.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the configuration is read-only")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple:
        return (FrozenMap, (dict(self),))

    def __deepcopy__(self, memo: dict) -> FrozenMap:
        return self


# ---------------------------------------------------------------------------------------
# generic value checks (the schema adds its domain ones)

def positive(v: Any) -> str | None:
    return None if v > 0 else "a number greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(choices)
    return check


def absolute_path(v: Any) -> str | None:
    return None if v.startswith("/") else "an absolute path"


# ---------------------------------------------------------------------------------------
# field declarations

def setting(default: Any, kind: type, check: Check | None = None,
            nullable: bool = False) -> Any:
    """A scalar field of type ``kind`` (int, float, bool or str), validated by ``check``;
    ``nullable`` lets the file write null (None: "as the profile says" and the like)."""
    return dataclasses.field(default=default,
                             metadata={"kind": kind, "check": check, "nullable": nullable})


def subsection(cls: type) -> Any:
    """A nested mapping read into dataclass ``cls`` (its defaults when absent).

    Returns a ``dataclasses.field`` with a default factory, so nothing is shared between
    instances (pyproject's ruff settings name this function as such).
    """
    return dataclasses.field(default_factory=cls, metadata={"kind": cls})


def plain(value: Any) -> Any:
    """Dataclasses, mappings and tuples as dicts and lists (for JSON and YAML output)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# the node tree

def _one_line(error: BaseException) -> str:
    """PyYAML's messages span lines (the problem, then "in <unicode string>, position N"):
    one line for the operator, who sees the file and line in front of it anyway."""
    return " ".join(str(error).split())


def check_depth(text: str, path: str, max_depth: int) -> None:
    """Refuse YAML nested deeper than ``max_depth`` mappings/lists, with the line where
    it goes too deep, before the (recursive) composer sees it: the event parser is not
    recursive, so this costs no stack however deep the text."""
    depth = 0
    # libyaml's event parser when present: the pure-Python scanner's look-ahead is
    # quadratic in the open flow levels (seconds for a 40,000-deep '[[[[...')
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    line = event.start_mark.line + 1 if event.start_mark else None
                    raise ConfigError(f"YAML nested more than {max_depth} levels deep "
                                      "(mappings and lists inside each other); no setting "
                                      "is that deep", path=path, line=line)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return  # compose reports syntax errors with their line


def compose(text: str, path: str, max_depth: int | None = None) -> yaml.Node:
    """The node tree of one YAML document; an empty document gives an empty mapping.

    ConfigError carries the line of a syntax error when PyYAML marks one, and refuses
    nesting deeper than ``max_depth`` (:func:`check_depth`).
    """
    if max_depth is not None:
        check_depth(text, path, max_depth)
    try:
        # the constructor already scans for non-printable characters (ReaderError)
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {_one_line(error)}", path=path) from None
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"not valid YAML: {error.problem or error.context}",
                          path=path, line=line) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {_one_line(error)}", path=path) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply to read", path=path) from None
    finally:
        loader.dispose()
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        root = yaml.MappingNode(_MAP_TAG, [])
    return root


def apply_override(root: yaml.Node, override: str, max_depth: int | None = None) -> yaml.Node:
    """Set ``KEY.PATH=VALUE`` (the value parsed as YAML) in ``root``, in place.

    The nodes the override brings carry no line but an ``hk_override`` attribute, so an
    error in them names ``-O ...`` instead of a line of the file.
    """
    keypath, sep, value = override.partition("=")
    if not sep or not keypath:
        raise ConfigError(f"-O {override!r}: expected KEY.PATH=VALUE")
    if max_depth is not None:
        check_depth(value, f"-O {keypath}", max_depth)
    try:
        value_node = yaml.compose(value or "null", Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(f"-O {override!r}: the value is not valid YAML") from None
    stack = [value_node] if value_node is not None else []
    while stack:
        item = stack.pop()
        item.start_mark = None
        item.hk_override = override  # type: ignore[attr-defined]
        if isinstance(item, yaml.MappingNode):
            stack.extend(n for pair in item.value for n in pair)
        elif isinstance(item, yaml.SequenceNode):
            stack.extend(item.value)
    node = root
    parts = keypath.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"-O {override!r}: {'.'.join(parts[:i])} is not a mapping")
        for key_node, child in node.value:
            if key_node.value == part:
                if i == len(parts) - 1:
                    node.value.remove((key_node, child))
                    break
                node = child
                break
        else:
            if i < len(parts) - 1:
                child = yaml.MappingNode(_MAP_TAG, [])
                node.value.append((yaml.ScalarNode(_STR_TAG, part), child))
                node = child
                continue
        if i == len(parts) - 1:
            key = yaml.ScalarNode(_STR_TAG, part)
            key.hk_override = override  # type: ignore[attr-defined]
            node.value.append((key, value_node))
    return root


def locate(root: yaml.Node, *keys: str) -> yaml.Node | None:
    """The key node of ``keys`` (a path of mapping keys) in ``root``, None if absent:
    what a cross-field error points at."""
    node: yaml.Node | None = root
    last = None
    for k in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        match = [(kn, vn) for kn, vn in node.value if kn.value == k]
        if not match:
            return None
        last, node = match[-1]
    return last


def describe(node: yaml.Node) -> str:
    """What a node is, for "expected X, got Y" ("a list", "an integer 3")."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    names = {"int": "an integer", "float": "a number", "bool": "a boolean",
             "null": "null", "str": "a string"}
    return f"{names.get(tag, tag)} {node.value!r}"


def suggestion(name: str, known: Sequence[str]) -> str:
    """'; did you mean 'x'?' for the closest of ``known``, or nothing."""
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {hint[0]!r}?" if hint else ""


class NodeWalker:
    """Turns a YAML node tree into dataclasses, raising ConfigError at the first problem.

    ``path`` only names the file in errors.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        origin = getattr(node, "hk_override", None)
        if origin is not None:
            return ConfigError(f"{message} (from -O {origin})", path=self.path, key=key or None)
        line = node.start_mark.line + 1 if node is not None and node.start_mark else None
        return ConfigError(message, path=self.path, line=line, key=key or None)

    def mapping(self, node: yaml.Node, key: str, known: Sequence[str]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The (key node, value node) of each key of mapping ``node``; every key must be
        one of ``known`` and appear once."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"expected a mapping, got {describe(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or key_node.tag != _STR_TAG:
                raise self.fail(key_node, key, f"keys must be names, got {describe(key_node)}")
            if name in out:
                first = out[name][0].start_mark.line + 1
                raise self.fail(key_node, full, f"duplicate key (first set on line {first})")
            if name not in known:
                choices = ", ".join(known)
                raise self.fail(key_node, full, f"unknown key{suggestion(name, known)} "
                                                f"(known here: {choices})")
            out[name] = (key_node, value_node)
        return out

    def section(self, node: yaml.Node, cls: type, key: str) -> Any:
        """Dataclass ``cls`` from mapping ``node``; fields marked ``internal`` are not
        read from the file, absent ones keep their defaults."""
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        given = self.mapping(node, key, [f.name for f in fields])
        values = {}
        for f in fields:
            if f.name not in given:
                continue
            _, value_node = given[f.name]
            full = f"{key}.{f.name}" if key else f.name
            values[f.name] = self.value(value_node, f, full)
        return cls(**values)

    def value(self, node: yaml.Node, f: dataclasses.Field, key: str) -> Any:
        """The value of field ``f``; subclasses handle their own ``kind`` values first."""
        kind = f.metadata.get("kind")
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            return self.section(node, kind, key)
        return self.scalar(node, key, kind, f.metadata.get("check"),
                           f.metadata.get("nullable", False))

    def scalar(self, node: yaml.Node, key: str, kind: Any, check: Check | None,
               nullable: bool) -> Any:
        """A scalar of Python type ``kind``: bool is no int here and an int is a fine
        float, non-finite floats are refused, then ``check`` has its say."""
        expected = {int: "an integer", float: "a number", bool: "true or false",
                    str: "a string"}[kind]
        if nullable:
            expected += " or null"
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected {expected}, got {describe(node)}")
        try:
            value = yaml.SafeLoader("").construct_object(node)
        except yaml.YAMLError:
            raise self.fail(node, key, f"expected {expected}, got a value with the YAML "
                                       f"tag {node.tag!r}") from None
        if value is None and nullable:
            return None
        ok = (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
              or (kind is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            raise self.fail(node, key, f"expected {expected}, got {describe(node)}")
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise self.fail(node, key, "expected a finite number")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.fail(node, key, f"expected {problem}, got {value!r}")
        return value
