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

import contextlib
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


# --- the servers' items, read again only when their text changed ------------------------------

_ITEMS: dict[str, Any] = {}  # an item of `servers:` (its text, dedented) -> its value, from earlier reads
_ITEMS_LIMIT = 20_000  # then start over: a process that reads ever new servers does not grow
_UNREAD = object()  # an item not in _ITEMS (its value may be None)
_KEY = re.compile(r"servers[ ]*:[ ]*(?:#.*)?")
_PLAIN = re.compile("[^&*!%|>\t\r\ufeff\x85\u2028\u2029]*")  # no anchor, alias, tag, directive, block scalar,
# tab, CR, BOM, nor a line break of YAML 1.1 that str.split("\n") would not see (NEL, LS, PS)


def load_reusing(text: str | bytes, loader: type[Any]) -> Any:
    """load(text), reading again only the items of the top-level `servers:` list whose text
    changed since an earlier read (a reload of 1,000 servers changes a few: composing all of
    them again was most of issue 12's reload time).

    Only for a document simple enough that each item of a block list reads the same alone as
    in place: no anchor or alias, tag, directive, block scalar, tab or CR anywhere, a single
    `servers:` key at the left margin followed by a block list whose items' further lines are
    all indented deeper than their dash. Anything else, or anything that does not parse this
    way, is read whole by load(); so are documents read for the first time (an item read alone
    costs more than in one document), whose items are then remembered.
    """
    try:
        pieces = _split(text) if isinstance(text, str) else None
    except Exception:  # not expected; whatever it is, the whole document is read as before
        pieces = None
    if pieces is None:
        return load(text, loader)
    skeleton, items = pieces
    if sum(item not in _ITEMS for item in items) * 4 > len(items):
        document = load(text, loader)  # mostly new: one read of the whole is quicker
        with contextlib.suppress(Exception):  # remembering is only an optimisation
            _remember(items, document)
        return document
    try:
        document = load(skeleton, loader)
        if not isinstance(document, dict) or document.get("servers") != []:
            return load(text, loader)
        values = [_item(item, loader) for item in items]
    except Exception:  # whatever it is, the whole document's read says it properly
        return load(text, loader)
    document["servers"] = values
    return document


def _item(text: str, loader: type[Any]) -> Any:
    value = _ITEMS.get(text, _UNREAD)
    if value is _UNREAD:
        parsed = load(text, loader)
        if not isinstance(parsed, list) or len(parsed) != 1:
            raise ValueError("not one item")
        value = parsed[0]
        _keep(text, value)
    return value


def _remember(items: list[str], document: Any) -> None:
    servers = document.get("servers") if isinstance(document, dict) else None
    if isinstance(servers, list) and len(servers) == len(items):
        for text, value in zip(items, servers, strict=True):
            _keep(text, value)


def _keep(text: str, value: Any) -> None:
    if len(_ITEMS) >= _ITEMS_LIMIT:
        _ITEMS.clear()
    _ITEMS[text] = value


def _split(text: str) -> tuple[str, list[str]] | None:
    """(the document with `servers: []` in place of the list, each item's text dedented), or
    None when the document is not one this can split safely."""
    if not _PLAIN.fullmatch(text) or "\n---" in text or text.startswith("---") or "\n..." in text:
        return None
    lines = text.split("\n")
    keys = [i for i, line in enumerate(lines) if line.startswith("servers")]
    if len(keys) != 1 or not _KEY.fullmatch(lines[keys[0]]):
        return None
    start = keys[0]
    first = next((i for i in range(start + 1, len(lines)) if lines[i].strip()), None)
    if first is None:
        return None
    indent = len(lines[first]) - len(lines[first].lstrip(" "))
    dash = " " * indent + "- "
    if not lines[first].startswith(dash):
        return None
    items: list[list[str]] = []
    end = len(lines)
    for i in range(first, len(lines)):
        line = lines[i]
        if line.startswith(dash):
            items.append([line[indent:]])
            continue
        stripped = line.lstrip(" ")
        if not stripped:
            items[-1].append("")
            continue
        depth = len(line) - len(stripped)
        if depth > indent:
            items[-1].append(line[indent:])
            continue
        if depth == 0 and stripped[0] not in "-#":
            end = i  # the next top-level key
            break
        return None  # a comment, or anything else, at or left of the dash: read it whole
    skeleton = "\n".join([*lines[:start], "servers: []", *lines[end:]])
    return skeleton, ["\n".join(item) + "\n" for item in items]
