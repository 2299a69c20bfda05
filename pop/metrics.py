"""/metrics: the PoP's snapshot in Prometheus' conventions (checked by `promtool check metrics`).

Every family carries a `pop` label, so one Prometheus can scrape a fleet. The names are a
contract with the alert rules and dashboards (docs/api.md lists them all): counters end in
`_total`, durations are histograms in seconds, ratios end in `_ratio`, states are one gauge
per state set to 1 for the current one.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pop import __version__
from pop.hysteresis import State
from pop.snapshot import Snapshot

GRACEFUL_SHUTDOWN = "65535:0"  # RFC 8326
POP_STATES = ("announced", "degraded", "guarded", "draining", "withdrawn", "drained", "hold-down")

Availability = Callable[[], Mapping[str, Any]]  # pop.availability.report, now


def _gauge(name: str, text: str, labels: list[str], samples: list[tuple[list[str], float]]) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(name, text, labels=labels)
    for values, value in samples:
        metric.add_metric(values, value)
    return metric


def _counter(name: str, text: str, labels: list[str], samples: list[tuple[list[str], float]]) -> CounterMetricFamily:
    metric = CounterMetricFamily(name, text, labels=labels)
    for values, value in samples:
        metric.add_metric(values, value)
    return metric


class PopCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot], state: Callable[[Snapshot], str],
                 availability: Availability | None = None) -> None:
        self.source = source
        self.state = state  # pop.status: announced, degraded, draining, withdrawn, drained, hold-down
        self.availability = availability

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        pop = snap.pop
        yield _gauge("pop_up", "1: the engine answers", ["pop"], [([pop], 1.0)])
        yield _gauge("pop_build_info", "the running pop's version", ["version", "python"],
                     [([__version__, platform.python_version()], 1.0)])
        yield from self._prefixes(snap)
        current = self.state(snap)
        yield _gauge("pop_state", "1 for the PoP's current state", ["pop", "state"],
                     [([pop, s], float(s == current)) for s in POP_STATES])
        per_pop: tuple[tuple[Callable[..., Metric], str, str, float], ...] = (
            (_gauge, "pop_drained", "1 while an operator drain is in force", float(snap.verdict.drained)),
            (_gauge, "pop_maintenance", "1 while maintenance (a drain with an end: pop maintenance, drain --until) "
                                        "is in force", float(bool(snap.ladder and snap.ladder.get("until")))),
            (_counter, "pop_verdict_changes", "announce/withdraw decisions", float(snap.verdict.changes)),
            (_gauge, "pop_pool_healthy_servers", "servers in the pool", float(snap.pool.healthy)),
            (_gauge, "pop_pool_servers", "servers configured", float(snap.pool.total)),
            (_gauge, "pop_apply_failing", "1 while a BGP or data-plane step waits for its retry",
             float(bool(snap.apply.bgp_error or snap.apply.dataplane_error))),
            (_counter, "pop_bgp_failures", "BGP passes ExaBGP refused", float(snap.apply.bgp_failures)),
            (_counter, "pop_dataplane_failures", "data-plane passes the kernel refused",
             float(snap.apply.dataplane_failures)),
            (_counter, "pop_dataplane_repairs", "read-backs that found and repaired drift", float(snap.apply.repairs)),
            (_counter, "pop_exabgp_command_errors", "commands ExaBGP answered with an error",
             _number(snap.extra.get("exabgp_command_errors"))),
            (_counter, "pop_exabgp_unparsed_messages", "messages from ExaBGP the engine could not parse",
             _number(snap.extra.get("exabgp_unparsed_messages"))),
        )
        for family, name, text, value in per_pop:
            yield family(name, text, ["pop"], [([pop], value)])
        reloads = snap.extra.get("reloads")
        counts = reloads if isinstance(reloads, Mapping) else {}
        yield _counter("pop_reloads", "configuration reloads (SIGHUP) by result", ["pop", "result"],
                       [([pop, result], float(counts.get(result, 0))) for result in ("ok", "refused")])
        sessions = snap.extra.get("sessions")
        peers = sessions.items() if isinstance(sessions, Mapping) else ()
        yield _gauge("pop_bgp_session_up", "1 while the BGP session with the neighbour is established",
                     ["pop", "neighbor"], [([pop, str(peer)], float(state == "up")) for peer, state in peers])
        if snap.dampening is not None:
            yield _gauge("pop_dampening_figure", "flap dampening's figure of merit (decayed to now)", ["pop"],
                         [([pop], float(snap.dampening["figure"]))])
            yield _gauge("pop_dampening_suppressed", "1 while flap dampening keeps the PoP from re-announcing",
                         ["pop"], [([pop], float(bool(snap.dampening["suppressed"])))])
        if snap.fleet is not None:
            yield from _fleet(pop, snap.fleet)
        yield from self._servers(snap)
        yield from _tails(snap)
        yield from self._availability(pop)
        yield from _external(snap)

    def _prefixes(self, snap: Snapshot) -> Iterator[Metric]:
        pop = snap.pop
        held = {a.prefix: a for a in snap.announced}
        announced, med, prepend, shutdown = [], [], [], []
        for prefix in sorted({*snap.prefixes, *held}):
            a = held.get(prefix)
            labels = [pop, prefix]
            announced.append((labels, float(a is not None)))
            med.append((labels, float(a.med or 0) if a is not None else 0.0))
            prepend.append((labels, float(a.as_path_prepend) if a is not None else 0.0))
            shutdown.append((labels, float(a is not None and GRACEFUL_SHUTDOWN in a.communities)))
        labels = ["pop", "prefix"]
        yield _gauge("pop_announced", "1 while the BGP session carries the prefix", labels, announced)
        yield _gauge("pop_prefix_med", "the MED announced with the prefix (0: none)", labels, med)
        yield _gauge("pop_prefix_as_path_prepend", "how often the AS is prepended to the prefix's path", labels,
                     prepend)
        yield _gauge("pop_prefix_graceful_shutdown", "1 while the prefix carries GRACEFUL_SHUTDOWN 65535:0", labels,
                     shutdown)

    def _servers(self, snap: Snapshot) -> Iterator[Metric]:
        pop = snap.pop
        up = GaugeMetricFamily("pop_server_up", "1 while the server is in the pool", labels=["pop", "server"])
        state = GaugeMetricFamily("pop_server_state", "1 for the server's current state",
                                  labels=["pop", "server", "state"])
        results = CounterMetricFamily("pop_check_results", "check results by outcome",
                                      labels=["pop", "server", "tier", "outcome"])
        latency = GaugeMetricFamily("pop_check_latency_seconds", "latency of the last successful probe",
                                    labels=["pop", "server", "tier"])
        for server in snap.servers:
            up.add_metric([pop, server.name], float(server.health.in_pool))
            for candidate in State:
                state.add_metric([pop, server.name, candidate.value], float(server.health.state is candidate))
            for tier_name, tier in server.tiers.items():
                results.add_metric([pop, server.name, tier_name, "ok"], float(tier.successes))
                results.add_metric([pop, server.name, tier_name, "fail"], float(tier.failures))
                if tier.last is not None and tier.last.latency is not None:
                    latency.add_metric([pop, server.name, tier_name], tier.last.latency)
        durations = HistogramMetricFamily("pop_check_duration_seconds", "how long each probe took, failures too",
                                          labels=["pop", "tier"])
        for tier_name, book in sorted(snap.durations.items()):
            durations.add_metric([pop, tier_name], book.cumulative, book.total)
        yield from (up, state, results, latency, durations)
        if snap.schedule is not None:
            lateness = HistogramMetricFamily("pop_probe_lateness_seconds", "how late each probe started against "
                                             "its schedule", labels=["pop"])
            lateness.add_metric([pop], snap.schedule.cumulative, snap.schedule.total)
            yield lateness
            yield _gauge("pop_probe_schedule_stretch_ratio", "the factor on every probe interval while the engine "
                         "cannot keep up (1: as configured)", ["pop"], [([pop], snap.schedule.stretch)])

    def _availability(self, pop: str) -> Iterator[Metric]:
        if self.availability is None:
            return
        report = self.availability()
        windows = report["windows"]
        yield _gauge("pop_availability_ratio", "share of the window announced, planned maintenance excluded "
                     "(NaN: nothing observed yet)", ["pop", "window"],
                     [([pop, name], _ratio(w["ratio"])) for name, w in windows.items()])
        yield _gauge("pop_error_budget_remaining_ratio", "share of the window's error budget not yet spent "
                     "(below 0: overspent)", ["pop", "window"],
                     [([pop, name], float(w["error_budget_remaining"])) for name, w in windows.items()])
        yield _gauge("pop_slo_target_ratio", "the availability objective (availability.slo)", ["pop"],
                     [([pop], float(report["slo"]))])


def _external(snap: Snapshot) -> Iterator[Metric]:
    x = snap.external
    if x is None:
        return
    pop = snap.pop
    yield _gauge("pop_external_blocking", "1 while tier 3 holds the PoP withdrawn", ["pop"],
                 [([pop], float(bool(x["blocking"])))])
    yield _gauge("pop_external_competent_agents", "fresh agents that reach another PoP", ["pop"],
                 [([pop], float(x["competent"]))])
    yield _gauge("pop_external_unreachable_agents", "competent agents that cannot reach this PoP", ["pop"],
                 [([pop], float(x["unreachable"]))])
    yield _counter("pop_external_dropped", "agent reports not taken, by reason", ["pop", "reason"],
                   [([pop, reason], float(count)) for reason, count in x["dropped"].items()])


def _tails(snap: Snapshot) -> Iterator[Metric]:
    """Latency tails and failure rates over the tails window (pop.tails), the degraded mark and
    the load signal's factor and CPU (pop.load, pop.adapters.telemetry)."""
    pop = snap.pop
    # a gauge, not a summary: the window is the engine's, and `quantile` is reserved for summaries
    quantiles = GaugeMetricFamily("pop_check_rtt_percentile_seconds", "probe RTT percentile over the tails window "
                                  "(successful probes)", labels=["pop", "server", "tier", "percentile"])
    failures = GaugeMetricFamily("pop_check_failure_ratio", "failed probes over the tails window",
                                 labels=["pop", "server", "tier"])
    degraded = GaugeMetricFamily("pop_server_degraded", "1 while the tails thresholds lower the server's weight",
                                 labels=["pop", "server"])
    factor = GaugeMetricFamily("pop_server_weight_factor_ratio", "the factor on the server's configured weight "
                               "(load signal times degraded mark)", labels=["pop", "server"])
    cpu = GaugeMetricFamily("pop_server_cpu_ratio", "the server's CPU utilisation as the load signal read it "
                            "(smoothed)", labels=["pop", "server"])
    for server in snap.servers:
        for tier, tail in server.tails.items():
            for q, value in (("50", tail.p50), ("95", tail.p95), ("99", tail.p99)):
                if value is not None:
                    quantiles.add_metric([pop, server.name, tier, q], value)
            failures.add_metric([pop, server.name, tier], tail.failure_rate)
        degraded.add_metric([pop, server.name], float(bool(server.degraded)))
        factor.add_metric([pop, server.name], server.factor)
        busy = None if server.load is None else server.load.get("cpu")
        if isinstance(busy, float):
            cpu.add_metric([pop, server.name], busy)
    yield from (quantiles, failures, degraded, factor, cpu)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _ratio(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _fleet(pop: str, shown: Mapping[str, Any]) -> Iterator[Metric]:
    """The fleet guard (pop.fleet.summary): the other PoPs seen, and whether it holds this one."""
    announcing = shown["announcing"]
    leaving = shown["leaving"]
    yield _gauge("pop_fleet_other_pops", "other PoPs of the fleet seen announcing the prefix", ["pop", "prefix"],
                 [([pop, p], float(len(ids))) for p, ids in announcing.items()])
    yield _gauge("pop_fleet_other_pops_leaving", "of those, the ones the fleet guard de-preferences",
                 ["pop", "prefix"], [([pop, p], float(len(leaving.get(p, ())))) for p in announcing])
    yield _gauge("pop_fleet_guard_holding", "1 while the fleet guard keeps the PoP announced (de-preferenced) "
                                            "although its verdict withdraws it", ["pop"],
                 [([pop], float(bool(shown["holding"])))])
    yield _counter("pop_fleet_guard_holds", "times the fleet guard held the PoP because the fleet was short",
                   ["pop"], [([pop], float(shown["holds"]))])
