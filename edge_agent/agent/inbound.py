"""Parsing what arrives from outside (configs, MQTT payloads) within limits, before anything acts on it.

Size is checked before decoding; nesting depth while parsing (a bracket scan for JSON, the composer for
YAML), so a hostile message cannot exhaust the stack; YAML aliases are counted against a limit and
duplicate keys refused; the parsed tree is then walked with a node budget, so a
shared (aliased) subtree counts every time it is reached and an alias bomb stops at the budget. Every
violation is a ConfigError with a path, a reason and a short value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from edge_agent.errors import ConfigError, shorten


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int
    max_depth: int  # nested mappings/lists
    max_nodes: int  # scalars, mappings and lists, counted as the tree is walked
    max_string: int  # characters in one string (keys included)
    max_items: int  # entries in one mapping or list
    max_aliases: int  # YAML aliases (*name) in one document; each use counts against max_nodes too


# A config file on the device's own disk: generous, but an alias bomb still stops.
LOCAL_FILE = InputLimits(max_bytes=4 << 20, max_depth=64, max_nodes=200_000, max_string=65_536, max_items=10_000,
                         max_aliases=10_000)


def check_size(data: bytes | str, limits: InputLimits, what: str) -> None:
    size = len(data.encode("utf-8", errors="replace")) if isinstance(data, str) else len(data)
    if size > limits.max_bytes:
        raise ConfigError("(message)", f"{what} is {size} bytes; the limit is {limits.max_bytes}")


def load_json(data: bytes | str, limits: InputLimits, what: str = "payload") -> Any:
    """JSON within the limits; ConfigError for anything else (not JSON, too big, too deep, too wide)."""
    check_size(data, limits, what)
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    depth = _json_depth(text)
    if depth > limits.max_depth:
        raise ConfigError("(message)", f"{what} nests {depth} levels deep; the limit is {limits.max_depth}")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ConfigError("(message)", f"{what} is not JSON: {exc}") from None
    check_tree(value, limits)
    return value


def load_yaml(text: str, limits: InputLimits, what: str = "config") -> Any:
    """YAML (or JSON) within the limits: no duplicate keys, at most max_aliases aliases."""
    check_size(text, limits, what)
    loader = None
    try:
        loader = _LimitedLoader(text, limits)  # the reader already refuses unprintable characters
        value = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "document"
        raise ConfigError(where, f"not valid YAML: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: an integer of too many digits
        raise ConfigError("document", f"not valid YAML: {shorten(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()
    check_tree(value, limits)
    return value


def check_tree(value: Any, limits: InputLimits) -> None:
    """Walk a parsed tree (iteratively) against the node, width and string limits."""
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise ConfigError(path or "(top level)", f"holds more than {limits.max_nodes} values (aliases count "
                              "every time they are used)")
        if depth > limits.max_depth:
            raise ConfigError(path or "(top level)", f"nests deeper than {limits.max_depth} levels")
        if isinstance(item, str):
            if len(item) > limits.max_string:
                raise ConfigError(path or "(top level)", f"a string of {len(item)} characters; the limit is "
                                  f"{limits.max_string}", shorten(item))
        elif isinstance(item, dict):
            if len(item) > limits.max_items:
                raise ConfigError(path or "(top level)", f"has {len(item)} keys; the limit is {limits.max_items}")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ConfigError(path or "(top level)", "keys must be strings", shorten(key))
                if len(key) > limits.max_string:
                    raise ConfigError(path or "(top level)", f"a key of {len(key)} characters", shorten(key))
                stack.append((child, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            if len(item) > limits.max_items:
                raise ConfigError(path or "(top level)", f"has {len(item)} entries; the limit is {limits.max_items}")
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (the text need not be valid JSON)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that stops at the depth, node and alias limits while composing, and refuses a key given
    twice in one mapping (PyYAML would silently keep the last)."""

    def __init__(self, stream: str, limits: InputLimits) -> None:
        super().__init__(stream)
        self.limits = limits
        self.depth = 0
        self.nodes = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise yaml.composer.ComposerError(None, None, f"more than {self.limits.max_aliases} YAML aliases",
                                                  self.peek_event().start_mark)
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > self.limits.max_depth:
                raise yaml.composer.ComposerError(None, None, f"nests deeper than {self.limits.max_depth} levels",
                                                  self.peek_event().start_mark)
            if self.nodes > self.limits.max_nodes:
                raise yaml.composer.ComposerError(None, None, f"holds more than {self.limits.max_nodes} values",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {shorten(key)!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)
