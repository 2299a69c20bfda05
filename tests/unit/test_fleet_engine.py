"""The fleet guard inside the engine: the verdict withdraws, the guard decides what goes on
the wire (scripted checks, a fake speaker, a manual clock; pure wiring, no sleeping)."""

import asyncio

from pop import fleet, noc, status
from pop.config import load
from pop.engine import Engine
from pop.fleet import Sighting
from tests.unit.test_engine import CONFIG_TEXT, DOWN, OK, POLICY, FakeSpeaker, ManualClock, Scripted

P = "198.51.100.1/32"
FLEET = CONFIG_TEXT + "dataplane: {mode: ecmp}\nfleet: {id: 2, tag: 64496, min_pops: 2, pace: 5, prepend: 2}\n"


def engine_with_tiers(text: str = FLEET) -> tuple[Engine, ManualClock, dict[str, list[tuple[str, fleet.Sighting]]]]:
    clock = ManualClock()
    checks = {name: [(Scripted("tcp"), POLICY), (Scripted("wireguard"), POLICY)] for name in ("a", "b")}
    engine = Engine(load(text), FakeSpeaker(), checks, clock=clock)  # type: ignore[arg-type]
    paths: dict[str, list[tuple[str, fleet.Sighting]]] = {"now": []}
    engine.fleet_source = lambda: paths["now"]
    for server in ("a", "b"):
        for tier in ("tcp", "wireguard"):
            for _ in range(2):
                engine.observe(server, tier, OK)
    return engine, clock, paths


def others(paths: dict[str, list[tuple[str, Sighting]]], engine: Engine, *pops: int, leaving: tuple[int, ...] = ()) -> None:
    paths["now"] = [(P, Sighting(frozenset({p}), frozenset({p}) & frozenset(leaving))) for p in pops]
    engine.fleet_changed()


def test_every_announcement_carries_the_pops_fleet_mark() -> None:
    async def main() -> None:
        engine, _, _ = engine_with_tiers()
        assert engine.desired[0].large_communities == ("64496:1:2",)

    asyncio.run(main())


def test_a_tier2_failure_with_the_fleet_short_is_a_de_preference_not_a_withdrawal() -> None:
    async def main() -> None:
        engine, clock, paths = engine_with_tiers()
        others(paths, engine, 1)  # one other PoP: without this one the fleet would be short
        for server in ("a", "b"):
            engine.observe(server, "wireguard", DOWN)
        assert not engine.verdict.announce
        (held,) = engine.desired
        assert engine.guard.phase == fleet.HELD
        assert held.as_path_prepend == 2 and "65535:0" in held.communities
        assert held.large_communities == ("64496:1:2", "64496:2:2")
        # the data plane keeps every server that answers at tier 1
        (route,) = engine.applier.desired.routes
        assert [h.address for h in route.nexthops] == ["10.0.2.1", "10.0.2.2"]
        assert engine.snapshot().fleet["holding"] is True  # type: ignore[index]
        assert [e.new for e in engine.events if e.kind == "fleet"] == ["held"]
        shown = status.to_json(engine.snapshot())
        assert shown["state"] == "guarded" and shown["fleet"]["announcing"] == {P: [1]}
        assert "<b style=\"color:#cf222e\">held</b>: fleet guard: de-preferenced instead of withdrawn" in \
            status.render_page(shown)
        page = noc.fleet((noc.Target("t1", "http://x"),), noc.FleetState({"t1": noc.Seen(shown, at=1.0)}), 2.0)
        assert page["red"] == ["t1"] and "held by the fleet guard" in noc.render(page)
        # a second PoP appears: this one leaves, and withdraws once the pace has passed
        others(paths, engine, 1, 3)
        assert engine.guard.phase == fleet.LEAVING_PHASE and engine.desired
        clock.now += 5.0
        engine.reevaluate()
        assert engine.desired == () and engine.guard.phase == fleet.LEFT

    asyncio.run(main())


def test_servers_dead_at_tier1_withdraw_at_once_whatever_the_fleet() -> None:
    async def main() -> None:
        engine, _, paths = engine_with_tiers()
        others(paths, engine)  # no other PoP at all
        for server in ("a", "b"):
            engine.observe(server, "tcp", DOWN)
        assert engine.desired == () and "tier 1" in engine.guard.reason

    asyncio.run(main())


def test_a_reload_that_removes_a_prefix_the_fleet_cannot_spare_is_refused() -> None:
    async def main() -> None:
        engine, _, paths = engine_with_tiers()
        others(paths, engine, 1)
        removed = FLEET.replace("198.51.100.1/32", "198.51.100.2/32")
        assert "it removes 198.51.100.1/32, which only 1 other PoP(s) announce" in engine.fleet_refuses(load(removed))
        assert engine.fleet_refuses(load(removed.replace("min_pops: 2", "min_pops: 0"))) == ""
        others(paths, engine, 1, 3)
        assert engine.fleet_refuses(load(removed)) == ""

    asyncio.run(main())


def test_without_a_fleet_nothing_changes() -> None:
    async def main() -> None:
        engine, _, _ = engine_with_tiers(CONFIG_TEXT)
        assert engine.desired[0].large_communities == ()
        for server in ("a", "b"):
            engine.observe(server, "wireguard", DOWN)
        assert engine.desired == () and engine.snapshot().fleet is None

    asyncio.run(main())


def test_the_speaker_keeps_fleet_marked_paths_of_any_prefix_so_a_reload_may_add_one() -> None:
    """The speaker was built with the configuration the PoP started with; a prefix a reload adds
    must still have its other PoPs seen, or the guard would believe the fleet short for it.
    Only paths with the fleet's marks are kept, so a full table costs nothing."""
    async def main() -> None:
        from pop.adapters.bgp import ExaBgpSpeaker
        from pop.exabgp import NeighborState, Update
        from tests.unit.test_hostile import _Sink

        config = load(FLEET)
        speaker = ExaBgpSpeaker(config, asyncio.StreamReader(), _Sink(), clock=lambda: 5.0)  # type: ignore[arg-type]
        speaker.handle(NeighborState("10.0.0.1", "up", ""))
        new = "198.51.100.9/32"  # not in the configuration the speaker has
        speaker.handle(Update("10.0.0.1", (new,), (), ((new, "0.0.0.1"),), (), ((64496, 1, 3),)))
        speaker.handle(Update("10.0.0.1", ("203.0.113.0/24",), (), (("203.0.113.0/24", ""),), ()))
        assert speaker.fleet_paths() == [(new, Sighting(frozenset({3})))]
        speaker.handle(Update("10.0.0.1", (), (new,), (), ((new, "0.0.0.1"),)))
        assert speaker.fleet_paths() == []

    asyncio.run(main())
