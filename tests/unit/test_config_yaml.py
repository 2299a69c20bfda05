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
