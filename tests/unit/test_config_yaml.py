"""pop.config_yaml gives what PyYAML's safe loader gives, for every kind of document."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pop import config_yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "docs" / "examples").glob("*.yaml"))

DOCUMENTS = [
    "",
    "~",
    "a: 1\nb: [1, -2, 0, 007, 0x1F, 1_000, +5, -0, '3', 1:30]\n",  # YAML 1.1 integers
    "f: [1.5, .inf, -.Inf, .nan, 1e3, 6.8523015e+5]\n",
    "b: [yes, No, on, OFF, true, False, y]\nn: [null, ~, Null, '']\n",
    "t: 2001-12-14t21:59:43.10-05:00\nd: 2002-12-14\n",
    "bin: !!binary aGVsbG8=\n",
    "base: &b {x: 1, y: 2}\nuse: *b\nmerged: {<<: *b, y: 3}\n",  # an alias, a merge key
    "list: &l [1, 2]\nagain: *l\n",
    "s: !!set {a, b}\no: !!omap [{a: 1}, {b: 2}]\n",
    "a: &x [*x]\n",  # recursive
    "dup: 1\ndup: 2\n",
    "1: int key\n2.5: float key\nnull: null key\ntrue: bool key\n",
    "servers:\n  - {name: s0, address: 10.0.0.1, port: 443, wireguard: {public_key: 'abc=', port: 51820}}\n",
    "s: !!str 12\ni: !!int '12'\n",
    "a: 1\nb: '1'\nc: \"1\"\nd: 1\ne: yes\nf: 'yes'\n",  # one text plain and quoted: only plain is remembered
]


@pytest.mark.parametrize("text", DOCUMENTS + [p.read_text() for p in EXAMPLES])
def test_the_same_values_as_the_safe_loader(text: str) -> None:
    expected = yaml.load(text, Loader=yaml.CSafeLoader)
    got = config_yaml.load(text, yaml.CSafeLoader)
    assert repr(got) == repr(expected)  # repr: nan is not equal to itself, and 1 == True


def test_aliases_are_the_same_object_as_in_the_safe_loader() -> None:
    got = config_yaml.load("a: &x [1]\nb: *x\n", yaml.CSafeLoader)
    assert got["a"] is got["b"]


@pytest.mark.parametrize("text", ["? [1, 2]\n: unhashable key\n", "a: b: c\n", "--- 1\n--- 2\n", "!!python/object:os.system x\n",
                                  "a: !!int xyz\n"])
def test_what_the_safe_loader_refuses_is_refused_alike(text: str) -> None:
    with pytest.raises((yaml.YAMLError, ValueError)) as safe:  # ValueError: PyYAML's for a few odd scalars
        yaml.load(text, Loader=yaml.CSafeLoader)
    with pytest.raises(type(safe.value)):
        config_yaml.load(text, yaml.CSafeLoader)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(values, st.booleans())
def test_generated_documents_load_alike(value: object, flow: bool) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow)
    assert repr(config_yaml.load(text, yaml.CSafeLoader)) == repr(yaml.load(text, Loader=yaml.CSafeLoader))


# --- load_reusing: the servers' items read again only when their text changed (issue 12) ------

HEAD = "pop: {name: p1, asn: 65101, router_id: 192.0.2.1}  # the PoP\nprefixes: [198.51.100.1/32]\n"
item_values = st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
     "address": st.sampled_from(["10.0.0.1", "10.0.0.2", "'10.0.0.3'", "fd00::1"])},
    optional={"port": st.integers(1, 65535), "weight": st.integers(1, 9),
              "enabled": st.sampled_from(["true", "no", "'yes'"]),
              "note": st.sampled_from(["'a # not a comment'", '"x: y"', "'- dash'", "plain words", "'1.5'", "0x1F",
                                       '"two\n      lines"', "first\n      second"])})


def render_item(fields: dict[str, object], flow: bool, indent: int, comment: bool) -> str:
    pad = " " * indent
    if flow:
        text = pad + "- {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"
        return text.replace("\n      ", "\n" + pad + "    ") + "\n"
    lines = []
    for n, (k, v) in enumerate(fields.items()):
        lines.append(f"{pad}{'- ' if n == 0 else '  '}{k}: {str(v).replace(chr(10) + '      ', chr(10) + pad + '    ')}")
        if comment and n == 0:
            lines.append(f"{pad}    # about {k}")
    return "\n".join(lines) + "\n"


def render(items: list[tuple[dict[str, object], bool, bool]], indent: int, blank: bool, tail: str) -> str:
    body = ("\n" if blank else "").join(render_item(f, flow, indent, comment) for f, flow, comment in items)
    return HEAD + "servers:  # the VPN servers\n" + body + tail


styled_items = st.lists(st.tuples(item_values, st.booleans(), st.booleans()), min_size=4, max_size=8)
tails = st.sampled_from(["", "checks: {l4: {kind: tcp}}\n", "\n# the end\nstatus:\n  enabled: true\n"])


@settings(max_examples=300, deadline=None)
@given(styled_items, st.sampled_from([0, 2, 4]), st.booleans(), tails, st.integers(0, 7),
       st.tuples(item_values, st.booleans(), st.booleans()))
def test_a_reread_with_an_item_changed_loads_as_the_safe_loader_does(  # noqa: PLR0917 - hypothesis draws
        items: list[tuple[dict[str, object], bool, bool]], indent: int, blank: bool, tail: str, at: int,
        new: tuple[dict[str, object], bool, bool]) -> None:
    """The first read remembers the items; the second reads only the changed one (and the rest
    of the document) and must still give exactly what the safe loader gives for the whole."""
    first = render(items, indent, blank, tail)
    changed = [*items]
    changed[at % len(items)] = new
    second = render(changed, indent, blank, tail)
    for text in (first, second):
        assert repr(config_yaml.load_reusing(text, yaml.CSafeLoader)) == repr(yaml.safe_load(text)), text


def test_a_reload_reads_only_the_items_that_changed() -> None:
    items = [f"  - {{name: s{i}, address: 10.0.{i // 250}.{i % 250 + 1}, port: 443}}\n" for i in range(40)]
    first = "pop: {name: p}\nservers:\n" + "".join(items) + "checks: {}\n"
    assert config_yaml.load_reusing(first, yaml.CSafeLoader) == yaml.safe_load(first)
    items[7] = "  - {name: s7, address: 10.9.9.9, port: 444}\n"
    second = "pop: {name: p}\nservers:\n" + "".join(items) + "checks: {}\n"
    read: list[str] = []
    real = config_yaml.load

    def counted(text: str | bytes, loader: type) -> object:
        read.append(str(text))
        return real(text, loader)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_yaml, "load", counted)
        got = config_yaml.load_reusing(second, yaml.CSafeLoader)
    assert got == yaml.safe_load(second) and got["servers"][7]["address"] == "10.9.9.9"
    assert len(read) == 2 and "s7" in read[1] and "s8" not in read[1], read  # the rest, and the one item


@pytest.mark.parametrize("text", [
    "servers:\n  - a\n# a comment at the margin\n  - b\n",  # a comment left of the items: read whole
    "servers:\n  - &x {a: 1}\n  - *x\n",  # an alias
    "servers:\n  - |\n    block\n",  # a block scalar
    "servers:\n  - a\nservers:\n  - b\n",  # the key twice
    "servers: [a, b]\n",  # a flow list
    "servers:\n- a\n- b\nx: 1\n",  # items at the margin
    "servers:\n  - a\n  -b\n",
    "servers:\n  - 'two\n  lines'\n",  # a continuation at the dash's depth
    "servers:\n  - x\x85other: 1\n",  # a line break of YAML 1.1 (NEL) inside what str.split sees as one line
    "servers:\n  - a\u2028  - b\n",
])
def test_documents_it_does_not_split_are_read_whole_alike(text: str) -> None:
    for _ in range(2):
        try:
            expected = yaml.safe_load(text)
        except yaml.YAMLError:
            with pytest.raises(yaml.YAMLError):
                config_yaml.load_reusing(text, yaml.CSafeLoader)
            continue
        assert repr(config_yaml.load_reusing(text, yaml.CSafeLoader)) == repr(expected)
