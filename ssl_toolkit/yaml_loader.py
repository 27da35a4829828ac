"""The YAML loader of configs and overrides: safe, and strict where ``yaml.safe_load`` is not.

``yaml.safe_load`` keeps the last of two equal keys without a word, and expands aliases without
bound: nine lines of ``&b [*a, *a, ...]`` make a billion values, which every later step (merging,
validation, the value echoed in an error) walks. :func:`load_yaml` refuses both, and an integer
beyond 64 bits, with a ``yaml.MarkedYAMLError`` that points at the line;
:func:`describe_yaml_error` turns any YAML error into one line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from optim.errors import short_repr

__all__ = ["MAX_NODES", "ConfigLoader", "describe_yaml_error", "load_yaml"]

MAX_NODES = 100_000
"""The most values (every scalar, list and mapping, aliases expanded) a document may hold: far
beyond any config, far below what an alias bomb expands to."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key repeated in one mapping, a document of more than
    :data:`MAX_NODES` values once aliases are expanded, an alias inside the value it names,
    and an integer beyond 64 bits.

    Merge keys (``<<: *defaults``) still work: a key of the mapping itself overrides one merged
    in, which is not a duplicate.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, aliases expanded
        self._expanded: dict[yaml.Node, int] = {}  # a node -> its values, aliases expanded
        # Each mapping's keys as written: PyYAML prepends merged keys to a mapping in place.
        self._written_keys: dict[yaml.MappingNode, list[yaml.Node]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose as PyYAML does, counting the values an alias stands for as if written out."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # an undefined alias is an error here
            size = self._expanded.get(node)
            if size is None:  # still being composed: the alias is inside its own value
                problem = f"alias *{event.anchor} refers to a value that contains it"
                raise ComposerError(None, None, problem, event.start_mark)
            self._count(size, event.start_mark)
            return node
        before = self._values
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._expanded[node] = self._values - before
        return node

    def _count(self, values: int, mark: yaml.Mark) -> None:
        self._values += values
        if self._values > MAX_NODES:
            problem = (
                f"the document holds more than {MAX_NODES:,} values once its aliases are expanded"
            )
            raise ComposerError(None, None, problem, mark)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        """PyYAML's mapping node, its keys noted before any merge key is flattened into it."""
        node = super().compose_mapping_node(anchor)
        self._written_keys[node] = [key_node for key_node, _ in node.value]
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        """PyYAML's mapping, refusing a key written twice in it (not one merged in by ``<<``)."""
        mapping = super().construct_mapping(node, deep=deep)
        first: dict[Any, yaml.Mark] = {}
        for key_node in self._written_keys[node]:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)  # constructed above: PyYAML's cached key
            if key in first:
                problem = f"duplicate key {short_repr(key)} (first at line {first[key].line + 1})"
                raise ConstructorError(None, None, problem, key_node.start_mark)
            first[key] = key_node.start_mark
        return mapping

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """PyYAML's integer, within 64 bits: no config number needs more, and a larger one
        (even in hex, ``0xfff...``) would fail later, in a seed or in writing the config."""
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (4300)
            value = None
        if value is None or value.bit_length() > 63:
            raise ConstructorError(
                None, None, "an integer beyond 64 bits", node.start_mark
            ) from None
        return value


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """One YAML document read with :class:`ConfigLoader` (safe: plain data, no Python tags)."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """What is wrong, on one line: PyYAML's message without its excerpt of the text."""
    problem = getattr(error, "problem", None)
    if not problem:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"{problem} ({context})" if context else problem
