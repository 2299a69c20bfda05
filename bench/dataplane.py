"""Data-plane benchmark: how fast a one-server membership change reaches the kernel, and how
many existing flows move when one server of N leaves — ECMP (hash-threshold) versus IPVS mh.

    .venv/bin/python bench/dataplane.py                 # both modes, N = 10, 100, 1000
    .venv/bin/python bench/dataplane.py --no-ipvs       # ECMP only (this host's kernel)
    .venv/bin/python bench/dataplane.py --json out.json

ECMP runs on this host in two private namespaces ("tdpb*"): a multipath route via N
on-link gateways, changed through `RouteTable.set()`. Which next hop a flow takes is asked
of the kernel itself (`ip route get ... ipproto udp sport P dport D`, L4 hash policy), so
the moved-flow figures are measurements, not the algorithm on paper.

IPVS runs inside the QEMU microVM (lab.microvm; this host has no IPVS): a NAT service with
N real servers changed through `IpvsTable.set()`; a client namespace in the VM sends one
UDP datagram per flow and the connection table (/proc/net/ip_vs_conn) says which real
server IPVS scheduled. The VM is software-emulated (TCG), so its times are an upper bound.

"Applied" means the call returned after the kernel acknowledged the last netlink request,
i.e. the new state is in the kernel. Everything is bounded in time and cleaned up.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pop.adapters.routes import DataplaneError, RoutePlan, RouteTable, normalize_route  # noqa: E402
from pop.desired import EcmpRoute, NextHop, RealServer, VirtualService  # noqa: E402

T = TypeVar("T")

VIP = "203.0.113.1"
VPORT = 51820
GOAL_MS = 50.0


def gateway(i: int) -> str:
    return f"10.200.{1 + i // 256}.{i % 256}"


def real_address(i: int) -> str:
    return f"10.201.{1 + i // 256}.{i % 256}"


def ms(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered) * 1e3, "p95": p95 * 1e3, "max": ordered[-1] * 1e3}


async def time_changes(
    build: Callable[[list[int]], T], apply: Callable[[T], Awaitable[object]], members: list[int], repeat: int
) -> tuple[list[float], list[float]]:
    """Seconds per one-server membership change: `apply(build(members - one))`, timed, then
    back to all members, untimed. The desired value is built before the clock starts: the
    measurement is from "new desired set" to "kernel acknowledged".

    Returns wall times and CPU times of this process. Netlink requests are processed by
    the kernel in the sender's context, so the CPU time includes the kernel's work, and it
    stays meaningful on a machine shared with other jobs, where wall time is mostly waiting
    for a core."""
    full = build(members)
    wall, cpu = [], []
    for r in range(repeat):
        leaving = members[(r * 7919) % len(members)]
        smaller = build([m for m in members if m != leaving])
        t0, c0 = time.perf_counter(), time.process_time()
        await apply(smaller)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        await apply(full)
    return wall, cpu


# ---------------------------------------------------------------------------------------
# ECMP on this host


def ecmp_route(members: Sequence[int]) -> EcmpRoute:
    return EcmpRoute(f"{VIP}/32", tuple(NextHop(gateway(i)) for i in members))


def lookup_flows(ns: str, flows: int) -> list[str]:
    """The next hop the kernel picks for each of `flows` UDP flows (distinct source ports)."""
    lines = "".join(f"route get {VIP} ipproto udp sport {10000 + f} dport {VPORT}\n" for f in range(flows))
    out = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"], input=lines, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    hops = [line.split(" via ")[1].split()[0] for line in out.splitlines() if " via " in line]
    if len(hops) != flows:
        raise RuntimeError(f"ip route get answered {len(hops)} of {flows} lookups")
    return hops


def resilient_reference(ns: str, sizes: Sequence[int], flows: int) -> dict[str, Any]:
    """Reference, not what pop programs: the same measurement with a *resilient* next-hop
    group (Linux >= 5.13, set up with iproute2), which reassigns only the leaving next
    hop's hash buckets."""
    result: dict[str, Any] = {}
    # iproute2 builds the group in a 1 KiB request buffer: about 128 members at most.
    sizes = [n for n in sizes if n <= 100]

    def batch(commands: str) -> None:
        proc = subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input=commands,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ip -batch: {proc.stderr.strip()[:300]}")

    for n in sizes:
        buckets = max(4096, 4 * n)
        ids = [str(i + 1) for i in range(n)]
        hops = "".join(f"nexthop add id {i + 1} via {gateway(i)} dev bench0\n" for i in range(n))
        group = f"nexthop add id 100000 group {'/'.join(ids)} type resilient buckets {buckets} idle_timer 0\n"
        batch(hops + group + f"route add {VIP}/32 nhid 100000\n")
        try:
            before = lookup_flows(ns, flows)
            leaving = n // 2
            rest = "/".join(i for i in ids if i != str(leaving + 1))
            replace_group = (
                f"nexthop replace id 100000 group {rest} type resilient buckets {buckets} idle_timer 0\n"
            )
            batch(replace_group)
            after = lookup_flows(ns, flows)
        finally:
            batch(f"route del {VIP}/32 nhid 100000\nnexthop flush\n")
        result[str(n)] = {
            "flows": flows,
            "moved": sum(1 for b, a in zip(before, after, strict=True) if b != a),
            "had_to_move": sum(1 for b in before if b == gateway(leaving)),
        }
    return result


async def ecmp_probe_limit(rt: RouteTable) -> dict[str, Any]:
    """The largest multipath next-hop set the kernel accepts in one route (bisection)."""
    # RTA_MULTIPATH is one netlink attribute and nla_len is 16 bits: 8 bytes of rtnexthop
    # plus 8 of RTA_GATEWAY per IPv4 next hop gives (65535 - 4) // 16 = 4095.
    good, bad, error = 2, 16384, ""
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            await rt.set([ecmp_route(range(mid))])
            good = mid
        except (DataplaneError, OSError, ValueError, OverflowError) as exc:
            bad, error = mid, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # pyroute2 encoder errors (struct.error) past the 16-bit length
            bad, error = mid, f"{type(exc).__name__}: {exc}"
    await rt.set([])
    return {"max_nexthops": good, "first_refused": bad, "error": error[:200]}


async def ecmp_bench(sizes: Sequence[int], repeat: int, flows: int) -> dict[str, Any]:
    from lab.netns import Netns, veth

    tag = f"tdpb{os.getpid() % 100000}"
    results: dict[str, Any] = {"sizes": {}}
    with Netns(f"{tag}a") as pop, Netns(f"{tag}b") as peer:
        veth(pop, "bench0", "10.200.0.1/16", peer, "bench1", "10.200.0.2/16")
        async with RouteTable(netns=pop.name, hash_policy=1) as rt:
            await rt.apply_hash_policy()
            for n in sizes:
                members = list(range(n))
                await rt.set([ecmp_route(members)])
                set_times, cpu_times = await time_changes(lambda m: [ecmp_route(m)], rt.set, members, repeat)
                # The same with read-back and plan done beforehand: the kernel's share.
                kernel_times, _ = await time_changes(
                    lambda m: RoutePlan(replace=(normalize_route(ecmp_route(m)),)), rt.apply, members, repeat
                )
                if await rt.read() != (normalize_route(ecmp_route(members)),):
                    raise RuntimeError("read-back differs from the desired route")
                before = lookup_flows(pop.name, flows)
                # Where the leaving server sits in the next-hop order matters to
                # hash-threshold; the middle one is the table's figure.
                by_position = {}
                for position, leaving in (
                    ("first", members[0]),
                    ("last", members[-1]),
                    ("middle", members[n // 2]),
                ):
                    await rt.set([ecmp_route([m for m in members if m != leaving])])
                    after = lookup_flows(pop.name, flows)
                    by_position[position] = sum(1 for b, a in zip(before, after, strict=True) if b != a)
                    await rt.set([ecmp_route(members)])
                results["sizes"][str(n)] = {
                    "set_ms": ms(set_times),
                    "cpu_ms": ms(cpu_times),
                    "kernel_ms": ms(kernel_times),
                    "flows": flows,
                    "moved": by_position["middle"],
                    "had_to_move": sum(1 for b in before if b == gateway(members[n // 2])),
                    "moved_by_position": by_position,
                }
                await rt.set([])
            results["limit"] = await ecmp_probe_limit(rt)
        results["resilient"] = resilient_reference(pop.name, sizes, flows)
    return results


# ---------------------------------------------------------------------------------------
# IPVS inside the microVM


def ipvs_service(members: Sequence[int]) -> VirtualService:
    reals = tuple(RealServer(real_address(i), VPORT) for i in members)
    return VirtualService("udp", VIP, VPORT, "mh", "nat", reals)


SENDER = r"""
import socket, sys
vip, vport, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for sport in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.202.0.2", sport)); s.sendto(b"x", (vip, vport)); s.close()
"""


def ip_vs_conn(ns: str) -> dict[tuple[int, int], str]:
    """(source port, service port) -> real server, from the namespace's IPVS connection table."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/ip_vs_conn"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    table: dict[tuple[int, int], str] = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        # Pro FromIP FPrt ToIP TPrt DestIP DPrt State Expires (hex addresses and ports)
        if len(parts) >= 7 and parts[0] == "UDP":
            table[int(parts[2], 16), int(parts[4], 16)] = str(ipaddress.ip_address(int(parts[5], 16)))
    return table


async def ipvs_inner(sizes: Sequence[int], repeat: int, flows: int) -> dict[str, Any]:
    """Runs inside the VM."""
    from lab.netns import Netns, veth
    from pop.adapters.ipvs import IpvsTable
    from pop.adapters.vip import VipSet

    tag = f"tdpi{os.getpid() % 100000}"
    results: dict[str, Any] = {"sizes": {}}
    with Netns(f"{tag}d") as director, Netns(f"{tag}c") as client:
        veth(client, "cl0", "10.202.0.2/24", director, "cl1", "10.202.0.1/24")
        client.run("ip", "route", "add", "default", "via", "10.202.0.1")
        async with VipSet(netns=director.name) as vips:
            await vips.set([f"{VIP}/32"])
        # mh-port: one client address sends all flows here, so the source port must count.
        flags = ["mh-fallback", "mh-port"]
        async with IpvsTable(owned=[f"{VIP}/32"], netns=director.name, flags=flags) as ipvs:
            for index, n in enumerate(sizes):
                members = list(range(n))
                await ipvs.set([ipvs_service(members)])
                times, cpu_times = await time_changes(lambda m: [ipvs_service(m)], ipvs.set, members, repeat)
                # Flows moved, as the scheduler decides them: the connection table would pin
                # existing flows to their real server on this director, so the same flows
                # are sent to two services, one with N real servers and one with the same
                # set less one (mh's hash keys are fixed constants, the lookup table depends
                # only on the real servers), and the chosen real servers compared.
                leaving = members[n // 2]
                smaller = ipvs_service([m for m in members if m != leaving])
                await ipvs.set([ipvs_service(members), replace(smaller, port=VPORT + 1)])
                # Fresh source ports per size: a deleted service's connections linger.
                first = 10000 + index * (flows + 1000)
                mine = range(first, first + flows)
                for port in (VPORT, VPORT + 1):
                    client.run(
                        sys.executable, "-c", SENDER, VIP, str(port), str(first), str(flows), timeout=600
                    )
                table = ip_vs_conn(director.name)
                before = {
                    sport: real for (sport, vport), real in table.items() if vport == VPORT and sport in mine
                }
                after = {
                    sport: real
                    for (sport, vport), real in table.items()
                    if vport == VPORT + 1 and sport in mine
                }
                common = sorted(set(before) & set(after))
                results["sizes"][str(n)] = {
                    "set_ms": ms(times),
                    "cpu_ms": ms(cpu_times),
                    "flows": len(common),
                    "moved": sum(1 for p in common if before[p] != after[p]),
                    "had_to_move": sum(1 for p in common if before[p] == real_address(leaving)),
                }
                await ipvs.set([])
    return results


def kernel_like_dest(key: Any, address: str) -> bytes:
    """One real server as IPVS_CMD_GET_DEST answers it (linux ip_vs_genl_fill_dest): our
    encoding plus what the kernel adds, connection counters and two nested statistics
    blocks, so that the decode below parses as many bytes as it would from the kernel."""
    from pop.adapters.netlink import _attr, _nested, encode_dest

    base = encode_dest(key, address, VPORT, 0, 1)  # SERVICE nest + DEST nest
    service_len = (struct.unpack_from("=H", base, 0)[0] + 3) & ~3
    dest_attrs = base[service_len + 4 :]
    extra = b"".join(_attr(kind, struct.pack("=I", 0)) for kind in (7, 8, 9))  # active, inactive, persist
    stats = _nested(10, b"".join(_attr(k, struct.pack("=I", 0)) for k in range(1, 11)))
    stats64 = _nested(12, b"".join(_attr(k, struct.pack("=Q", 0)) for k in range(1, 11)))
    return _nested(2, dest_attrs + extra + stats + stats64)


def ipvs_host_cpu(sizes: Sequence[int], repeat: int) -> dict[str, Any]:
    """The adapter's own CPU work in an IPVS set() for one server leaving, on this host
    (which has no IPVS): decode a dump of N real servers as the kernel sends it, plan,
    encode the one DEL_DEST. Everything but the kernel's part, which is one request."""
    from pop.adapters.ipvs import ServiceEntry, encode_op, plan_services
    from pop.adapters.netlink import IpvsServiceKey, decode_dest, genl

    key = IpvsServiceKey(2, 17, VIP, VPORT)
    result: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        members = list(range(n))
        dump = [memoryview(genl(8, kernel_like_dest(key, real_address(i)))) for i in members]
        times, cpu = [], []
        for r in range(repeat):
            desired = ipvs_service([m for m in members if m != members[(r * 7919) % n]])
            t0, c0 = time.perf_counter(), time.process_time()
            reals = tuple(RealServer(d.address, d.port, d.weight) for d in (decode_dest(m, 2) for m in dump))
            current = replace(ipvs_service([]), reals=reals)
            ops = plan_services([ServiceEntry(desired, 8)], [ServiceEntry(current, 8)])
            payloads = [encode_op(op) for op in ops]
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert len(payloads) == 1, ops
        result["sizes"][str(n)] = {"set_ms": ms(times), "cpu_ms": ms(cpu)}
    return result


def ipvs_bench(sizes: Sequence[int], repeat: int, flows: int, timeout: float) -> dict[str, Any]:
    try:
        from lab.microvm import VmError, run_in_vm
    except ImportError as exc:
        return {"skipped": f"lab.microvm not available: {exc}"}
    argv = [
        sys.executable,
        str(ROOT / "bench" / "dataplane.py"),
        "--inner-ipvs",
        "--sizes",
        ",".join(map(str, sizes)),
        "--repeat",
        str(repeat),
        "--flows",
        str(flows),
    ]
    try:
        vm = run_in_vm(argv, modules=["ip_vs", "ip_vs_mh"], timeout=timeout)
    except VmError as exc:
        return {"skipped": f"microVM: {exc}"[:800]}
    for line in vm.output.splitlines():
        if line.startswith("IPVS-RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("IPVS-RESULT "))
            return result
    return {"skipped": f"VM run failed (exit {vm.returncode}): {vm.output[-800:]}"}


# ---------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows = [
        f"{'mode':<5} {'N':>5} {'set() median':>13} {'p95':>8} {'CPU':>7} {'kernel':>8} {'goal':>5}"
        f" {'flows':>6} {'moved':>6} {'had to':>7} {'moved/had to':>13}"
    ]
    for mode in ("ecmp", "ipvs"):
        data = results.get(mode, {})
        if "skipped" in data:
            rows.append(f"{mode:<5} skipped: {data['skipped']}")
            continue
        for n, row in sorted(data.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
            kernel = f"{row['kernel_ms']['median']:7.2f}" if "kernel_ms" in row else "      -"
            ok = "ok" if row["set_ms"]["median"] < GOAL_MS else "MISS"
            ratio = row["moved"] / row["had_to_move"] if row["had_to_move"] else float("nan")
            rows.append(
                f"{mode:<5} {int(n):>5} {row['set_ms']['median']:10.2f} ms {row['set_ms']['p95']:8.2f}"
                f" {row['cpu_ms']['median']:7.2f} {kernel} {ok:>5} {row['flows']:>6} {row['moved']:>6}"
                f" {row['had_to_move']:>7} {ratio:>12.2f}x"
            )
    for n, row in sorted(
        results.get("ipvs_host_cpu", {}).get("sizes", {}).items(), key=lambda kv: int(kv[0])
    ):
        rows.append(
            f"IPVS N={n}: adapter CPU on this host (decode N-server dump, plan, encode), no kernel:"
            f" median {row['set_ms']['median']:.2f} ms (CPU {row['cpu_ms']['median']:.2f} ms),"
            f" p95 {row['set_ms']['p95']:.2f} ms"
        )
    ecmp, ipvs = results.get("ecmp", {}).get("sizes", {}), results.get("ipvs", {}).get("sizes", {})
    for n in sorted(set(ecmp) & set(ipvs), key=int):
        e = ecmp[n]["moved"] / ecmp[n]["flows"]
        i = ipvs[n]["moved"] / ipvs[n]["flows"] if ipvs[n]["flows"] else float("nan")
        ratio = f"{e / i:.1f}x" if i else "inf"
        rows.append(
            f"N={n}: one server leaves: ECMP moves {e:.1%} of flows, IPVS mh {i:.1%}, ideal {1 / int(n):.1%};"
            f" ECMP/mh = {ratio}"
        )
    for n, row in sorted(ecmp.items(), key=lambda kv: int(kv[0])):
        pos = ", ".join(f"{k} {v / row['flows']:.1%}" for k, v in row.get("moved_by_position", {}).items())
        rows.append(f"ECMP N={n}: flows moved by the position of the leaving next hop: {pos}")
    for n, row in sorted(results.get("ecmp", {}).get("resilient", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(
            f"ECMP N={n}, resilient next-hop group (reference, not used by pop):"
            f" {row['moved'] / row['flows']:.1%} of flows moved ({row['moved']}), {row['had_to_move']} had to"
        )
    if "limit" in results.get("ecmp", {}):
        lim = results["ecmp"]["limit"]
        rows.append(
            f"ECMP: at most {lim['max_nexthops']} IPv4 next hops per route ({lim['first_refused']} refused: "
            f"{lim['error']})"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--flows", type=int, default=4000)
    parser.add_argument("--ipvs-flows", type=int, default=2000)
    parser.add_argument("--no-ipvs", action="store_true")
    parser.add_argument("--no-ecmp", action="store_true")
    parser.add_argument("--vm-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--inner-ipvs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inner_ipvs:
        result = asyncio.run(ipvs_inner(sizes, args.repeat, args.flows))
        print("IPVS-RESULT " + json.dumps(result), flush=True)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    if not args.no_ecmp:
        results["ecmp"] = asyncio.run(ecmp_bench(sizes, args.repeat, args.flows))
    if not args.no_ipvs:
        results["ipvs_host_cpu"] = ipvs_host_cpu(sizes, args.repeat)
        results["ipvs"] = ipvs_bench(sizes, max(3, args.repeat // 4), args.ipvs_flows, args.vm_timeout)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
