"""YAML read strictly: plain data, every problem one ConfigError line, and the text of each boolean kept
so an error can quote ``yes`` as it was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from depthbench.errors import ConfigError


def read_yaml(path: Path) -> tuple[Any, dict[str, str]]:
    """A YAML file as plain data, and the source text of each boolean in it by dotted key.

    Every problem is one ConfigError line: unreadable file, YAML that does not parse, and a key written
    twice in one mapping (PyYAML keeps the last silently, so a second ``train:`` block would drop the
    first). Merge keys (``<<: *anchor``) are YAML's way of repeating keys on purpose and stay allowed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, key: str = "") -> tuple[Any, dict[str, str]]:
    """:func:`read_yaml` for YAML text from ``source``; ``key`` is the dotted key the text is the value of."""
    fast = getattr(yaml, "CSafeLoader", None)  # libyaml, where PyYAML was built with it: a long grid parses fast
    if fast is not None:
        try:
            return _parse(fast(text), source, key)
        except ConfigError:
            pass  # told again by the Python parser, whose messages are the ones documented
    return _parse(yaml.SafeLoader(text), source, key)


def _parse(loader: Any, source: str, key: str) -> tuple[Any, dict[str, str]]:
    booleans: dict[str, str] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, booleans
        _walk_yaml(node, key, booleans, set(), source)
        return loader.construct_document(node), booleans
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: YAML does not parse{where}: {problem}") from None
    finally:
        loader.dispose()


def _walk_yaml(node: yaml.Node, key: str, booleans: dict[str, str], seen: set[int], source: str) -> None:
    """Check ``node``'s mappings for repeated keys and note its booleans' text, each node once (an
    alias repeats a node; walking it again could take exponential time)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                _walk_yaml(value_node, key, booleans, seen, source)
                continue
            name = f"{key}.{key_node.value}" if key else key_node.value
            if key_node.value in first:
                fix = ("a later block silently replaces an earlier one; merge them"
                       if isinstance(value_node, yaml.MappingNode)
                       else "a later value silently replaces an earlier one; keep one")
                here, there = key_node.start_mark, first[key_node.value].start_mark
                col = here.line == there.line  # `{steps: 5, steps: 6}`: the line alone does not tell them apart
                raise ConfigError(
                    f"{source}: duplicate key '{name}' at line {here.line + 1}{f', column {here.column + 1}' * col} "
                    f"(first at line {there.line + 1}{f', column {there.column + 1}' * col}): {fix}")
            first[key_node.value] = key_node
            _walk_yaml(value_node, name, booleans, seen, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_yaml(item, f"{key}[{i}]", booleans, seen, source)
    elif node.tag == "tag:yaml.org,2002:bool":
        booleans[key] = node.value
