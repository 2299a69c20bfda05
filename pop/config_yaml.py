"""YAML to plain values, as PyYAML's safe loader gives them, in a third of its time.

With libyaml, composing a configuration of 1,000 servers into nodes takes ~45 ms; PyYAML's
SafeConstructor then spends ~100 ms more turning the nodes into dicts, lists and scalars,
which a reload of one changed server pays in full (issue 12). Here the plain cases are built
directly: mappings and sequences with the standard tags, strings, decimal integers; every
other scalar goes to the SafeConstructor's own method for its tag (YAML 1.1's octal and
sexagesimal integers, floats, booleans, nulls, timestamps). Anything less common (a merge
key, a set, an explicit or local tag, a recursive alias, a non-scalar key) is handed to the
SafeConstructor whole, so the result is always the safe loader's. The composer resolves each
distinct plain scalar's tag once per document.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import BaseResolver

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _MAP, _SEQ = _TAG + "str", _TAG + "int", _TAG + "map", _TAG + "seq"
_DECIMAL = re.compile(r"-?[1-9][0-9]*|0")
_SCALARS: dict[str, Callable[[Any, Node], Any]] = {
    _TAG + name: getattr(SafeConstructor, f"construct_yaml_{name}")
    for name in ("null", "bool", "int", "float", "binary", "timestamp")}
_LOADERS: dict[type[Any], type[Any]] = {}
_resolve: Callable[..., Any] = BaseResolver.resolve  # called unbound: super() costs as much as the lookup it saves
_BUSY = object()  # a collection being built: an alias to it is a recursive document


class _Unusual(Exception):
    """The document needs the SafeConstructor itself."""


def load(text: str | bytes, loader: type[Any]) -> Any:
    """The single document in text, as `yaml.load(text, Loader=loader)` returns it; YAMLError as it raises."""
    parser = _remembering(loader)(text)
    try:
        node = parser.get_single_node()
        if node is None:
            return None
        try:
            return _value(node, parser, {})
        except _Unusual:
            return parser.construct_document(node)
    finally:
        parser.dispose()


def _remembering(loader: type[Any]) -> type[Any]:
    """The loader, resolving each distinct plain scalar's tag once per document: with no path
    resolver (the safe loader has none) a plain scalar's tag depends on its text alone, and a
    list of 1,000 servers repeats the same keys 1,000 times (a quarter of libyaml's compose)."""
    if loader in _LOADERS:
        return _LOADERS[loader]

    class Remembering(loader):  # type: ignore[misc]  # a class chosen at run time
        def __init__(self, stream: str | bytes) -> None:
            super().__init__(stream)
            self.tags: dict[str, str] = {}

        def resolve(self, kind: type[Node], value: Any, implicit: Any) -> Any:
            if kind is not ScalarNode or not implicit[0] or self.yaml_path_resolvers:
                return _resolve(self, kind, value, implicit)
            tag = self.tags.get(value)
            if tag is None:
                tag = self.tags[value] = _resolve(self, kind, value, implicit)
            return tag

    return _LOADERS.setdefault(loader, Remembering)


def _value(node: Node, constructor: Any, built: dict[int, Any]) -> Any:
    kind = node.__class__
    if kind is ScalarNode:
        tag, text = node.tag, node.value
        if tag == _STR:
            return text
        if tag == _INT and _DECIMAL.fullmatch(text):
            return int(text)
        construct = _SCALARS.get(tag)
        if construct is None:
            raise _Unusual
        return construct(constructor, node)
    done = built.get(id(node))
    if done is _BUSY:
        raise _Unusual
    if done is not None:
        return done  # an alias: the same object, as the SafeConstructor gives it
    built[id(node)] = _BUSY
    value: Any
    if kind is SequenceNode and node.tag == _SEQ:
        value = [_value(item, constructor, built) for item in node.value]
    elif kind is MappingNode and node.tag == _MAP:
        value = {}
        for key, item in node.value:
            if key.__class__ is not ScalarNode:
                raise _Unusual  # a merge key is a scalar of its own tag, handled above
            # a string key or value without the call: most of a configuration's nodes
            value[key.value if key.tag == _STR else _value(key, constructor, built)] = (
                item.value if item.tag == _STR and item.__class__ is ScalarNode else _value(item, constructor, built))
    else:
        raise _Unusual
    built[id(node)] = value
    return value

