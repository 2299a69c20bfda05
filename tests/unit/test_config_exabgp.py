"""Whatever the loader accepts, ExaBGP reads back as exactly what was configured.

The rendered exabgp.conf goes through ExaBGP's own validator (`exabgp validate -v`, what
`pop run` uses), and its parser trace is compared with the configuration: the same
neighbors, each with one description (the configured text) and one peer-as. Text that
closed ExaBGP's string early would show up as extra or different statements.
"""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pop.config import Config, ConfigError, load
from pop.exabgp import render_config, render_env

EXABGP = Path(sys.executable).parent / "exabgp"
ENGINE = ["/usr/bin/python3", "-m", "pop", "engine", "-c", "/etc/pop/pop.yaml"]
# "configuration   . peer-as          | '65000'" (ExaBGP joins a statement's tokens as 'a' 'b')
TRACE = re.compile(r"^configuration\s+([.<>])\s+(\S+)\s+\|\s?(.*)$")


def document(descriptions: list[str]) -> str:
    return yaml.safe_dump({
        "pop": {"name": "ams1", "asn": 65101, "router_id": "192.0.2.11"},
        "neighbors": [{"address": f"10.0.1.{i + 1}", "peer_as": 65000 + i, "description": d}
                      for i, d in enumerate(descriptions)],
        "prefixes": ["198.51.100.1/32"],
        "servers": [{"name": "vpn1", "address": "10.0.2.10"}],
    })


def parsed_by_exabgp(config: Config, tmp: Path) -> dict[str, dict[str, list[str]]]:
    """Each neighbor ExaBGP parsed, with the values of its description and peer-as statements."""
    conf, env = tmp / "exabgp.conf", tmp / "exabgp.env"
    conf.write_text(render_config(config, ENGINE))
    env.write_text(render_env(config))
    result = subprocess.run([str(EXABGP), "--env-file", str(env), "validate", "-v", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    neighbors: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    depth = 0
    for line in (result.stdout + result.stderr).splitlines():
        match = TRACE.match(line)
        if match is None:
            continue
        kind, statement, value = match.groups()
        if kind == ">" and statement == "neighbor":
            current = neighbors.setdefault(value.strip("'"), {"description": [], "peer-as": []})
            depth = 1
        elif kind == ">":
            depth += 1
        elif kind == "<":
            depth -= 1
        elif current is not None and depth == 1 and statement in current:
            current[statement].append(value)
    return neighbors


def configured(config: Config) -> dict[str, dict[str, list[str]]]:
    return {n.address: {"description": [f"'{n.description}'"], "peer-as": [f"'{n.peer_as}'"]}
            for n in config.neighbors}


def accepted(description: str) -> bool:
    try:
        load(document([description]))
    except ConfigError as exc:
        assert all(p.startswith("pop.yaml: neighbors[0].description: ") for p in exc.problems), exc.problems
        return False
    return True


# printable ASCII (ExaBGP's tokeniser treats "'\\;{}[](),# specially) and the troublemakers beyond it
tricky = st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + list("\t\n\r\x85\u2028\u00fc\u0666"))
descriptions = st.one_of(st.text(alphabet=tricky, min_size=1, max_size=24), st.text(min_size=1, max_size=24))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(descriptions, min_size=1, max_size=4))
@example(["a;b}c{d", "#x [y] (z), w", " ", "peer-as 64999"])
def test_exabgp_reads_every_accepted_description_back_unchanged(tmp_path: Path, texts: list[str]) -> None:
    kept = [text for text in texts if accepted(text)] or ["plain"]
    config = load(document(kept))
    assert [n.description for n in config.neighbors] == kept
    assert parsed_by_exabgp(config, tmp_path) == configured(config)


def test_the_comparison_sees_an_injected_statement(tmp_path: Path) -> None:
    """Past the loader, a quote in a description changes what ExaBGP reads: the check can fail."""
    config = load(document(["plain"]))
    forged = dataclasses.replace(config, neighbors=(
        dataclasses.replace(config.neighbors[0], description='x"; peer-as 64999; description "y'),))
    assert parsed_by_exabgp(forged, tmp_path) != configured(forged)


@pytest.mark.parametrize("description", ['x"; peer-as 64999; description "y', "x'; peer-as 64999; '",
                                         "x\\\"; peer-as 64999; description \\\"y", "x\n}\nneighbor 10.9.9.9 {"])
def test_the_loader_refuses_descriptions_that_would_inject(description: str) -> None:
    assert not accepted(description)


def test_a_newline_in_the_config_path_stays_inside_the_comment(tmp_path: Path) -> None:
    """The file's path (the loader's `source`) is echoed in a comment at the top of exabgp.conf."""
    source = "/etc/pop/x\nneighbor 10.9.9.9 { router-id 1.1.1.1; local-as 1; peer-as 64999; }\n#.yaml"
    config = load(document(["plain"]), source)
    assert parsed_by_exabgp(config, tmp_path) == configured(config)


@pytest.mark.parametrize("path", ['/etc/po"p/pop.yaml', "/etc/po'p/pop.yaml", "/etc/po\\p/pop.yaml",
                                  "/etc/pop\n/pop.yaml", "/etc/p\u00f6p/pop.yaml"])
def test_an_engine_path_exabgp_cannot_read_is_refused_by_name(path: str) -> None:
    config = load(document(["plain"]), path)
    with pytest.raises(ValueError, match="may not contain") as info:
        render_config(config, ["/usr/bin/python3", "-m", "pop", "engine", "-c", path])
    assert repr(path) in str(info.value)


def test_an_engine_path_with_spaces_and_syntax_reaches_exabgp_as_one_argument(tmp_path: Path) -> None:
    path = "/etc/my pop;{x}#[1]/pop.yaml"
    config = load(document(["plain"]), path)
    conf, env = tmp_path / "exabgp.conf", tmp_path / "exabgp.env"
    conf.write_text(render_config(config, ["/usr/bin/python3", "-m", "pop", "engine", "-c", path]))
    env.write_text(render_env(config))
    result = subprocess.run([str(EXABGP), "--env-file", str(env), "validate", "-v", str(conf)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    run = [m.group(3) for line in (result.stdout + result.stderr).splitlines()
           if (m := TRACE.match(line)) and m.group(2) == "run"]
    assert run == [f"'/usr/bin/python3' '-m' 'pop' 'engine' '-c' '{path}'"]


def test_pop_run_names_a_config_path_exabgp_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pop.runner import run

    directory = tmp_path / 'my "pops"'
    directory.mkdir()
    path = directory / "pop.yaml"
    data = yaml.safe_load(document(["plain"]))
    data["pop"]["runtime_dir"] = str(tmp_path / "run")
    path.write_text(yaml.safe_dump(data))
    assert run(path) == 2
    assert f"the engine command cannot name {str(path)!r}: it may not contain '\"'" in capsys.readouterr().err


def test_exabgp_accepts_the_fleet_capabilities_with_graceful_restart(tmp_path: Path) -> None:
    """A PoP in a fleet offers ADD-PATH receive and keeps an adj-rib-in (pop.fleet); ExaBGP's
    own validator reads them, next to graceful restart."""
    text = document(["r1"]) + "fleet: {id: 1, tag: 64496}\nexabgp: {graceful_restart: 30}\n"
    config = load(text)
    rendered = render_config(config, ENGINE)
    assert "add-path receive;" in rendered and "adj-rib-in true;" in rendered and "graceful-restart 30;" in rendered
    assert parsed_by_exabgp(config, tmp_path) == configured(config)
