"""`pop wg-probe`: a one-shot WireGuard handshake diagnostic, like ping, for a person at a terminal.

    pop wg-probe HOST[:PORT] --server-key KEY --probe-key-file FILE [--psk-file FILE]
                 [--count N] [--interval S] [--timeout S]
                 [--through TARGET --tunnel-address ADDR [--data-timeout S]]

Sends N handshake initiations from the probe key (the same WireGuardCheck the engine runs),
prints one line per handshake with its result and round trip, then a summary. With
`--through`, each handshake is followed by an ICMP echo to TARGET inside the tunnel, from
the probe's tunnel address (`--tunnel-address`, in the server's allowed-ips for the probe
peer), and each line shows the handshake time, the data round trip and the outcome.

Exit status: 0 when every handshake succeeded; 1 when at least one failed (the summary says
how many; an interrupted run counts the handshakes completed, and none completed is a
failure); 2 for usage and key errors (bad key, unreadable or group/world-readable key file).
"Mostly works" is a failure on purpose: a server that drops one handshake in three is what
the engineer running this needs to hear about.

The probe key is shared with the running engine: the server answers one initiation per key
every 20 ms, so a probe that lands within 20 ms of the engine's may time out (rarely; the
wall-clock timestamps of both processes interleave correctly otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from pop import wgkeys
from pop.checks.base import CheckResult
from pop.checks.tunnel import Echo
from pop.checks.wireguard import Exchange, WireGuardCheck

DEFAULT_PORT = 51820
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_target(text: str) -> tuple[str, int]:
    """HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address (default port 51820)."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text}: expected [IPv6]:PORT")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text}: expected HOST:PORT with a port in 1-65535")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pop wg-probe",
        description="Send WireGuard handshake initiations from the probe key and validate the responses.",
        epilog="exit status: 0 all handshakes ok, 1 any handshake failed, 2 usage or key error",
    )
    p.add_argument("target", metavar="HOST:PORT", help=f"the VPN server (port defaults to {DEFAULT_PORT})")
    p.add_argument("--server-key", required=True, help="the server's WireGuard public key (base64)")
    p.add_argument("--probe-key-file", required=True, help="probe private key file (wg genkey), mode 0600")
    p.add_argument("--psk-file", help="preshared key file (wg genpsk), mode 0600")
    p.add_argument("--count", "-c", type=int, default=3, help="handshakes to send (default 3)")
    p.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between handshakes (default 1)")
    p.add_argument("--timeout", "-W", type=float, default=1.0, help="seconds to wait for each (default 1)")
    p.add_argument("--through", metavar="TARGET", help="after each handshake, ping TARGET (IPv4) through the tunnel")
    p.add_argument("--tunnel-address", metavar="ADDR",
                   help="the probe's IPv4 address inside the tunnel (needed with --through)")
    p.add_argument("--data-timeout", type=float, default=0.3,
                   help="seconds to wait for the reply through the tunnel (default 0.3)")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.count < 1 or args.interval < 0 or args.timeout <= 0 or args.data_timeout <= 0:
        parser.error("--count must be >= 1, --interval >= 0, --timeout and --data-timeout > 0")
    if args.through and not args.tunnel_address:
        parser.error("--through needs --tunnel-address (the probe peer's address inside the tunnel)")
    try:
        echo = Echo(args.tunnel_address, args.through) if args.through else None
        host, port = parse_target(args.target)
        try:
            server_key = wgkeys.parse_public_key(args.server_key)
        except ValueError as exc:
            raise ValueError(f"--server-key: {exc}") from None
        probe_key = wgkeys.read_private_key(args.probe_key_file)
        psk = wgkeys.read_psk(args.psk_file) if args.psk_file else None
        check = WireGuardCheck(host, port, server_key, probe_key, psk=psk, timeout=args.timeout, through=echo,
                               data_timeout=args.data_timeout)
    except ValueError as exc:
        print(f"pop wg-probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"WG-PROBE {host}:{port}: server key {wgkeys.encode_key(server_key)}, "
        f"probe key {wgkeys.encode_key(wgkeys.public_key_of(probe_key))}, psk {'yes' if psk else 'no'}"
        + (f", through {echo.target} from {echo.source}" if echo else ""),
        flush=True,
    )
    results: list[CheckResult] = []
    start = time.monotonic()
    try:
        asyncio.run(_run(check, args.count, args.interval, results))
    except KeyboardInterrupt:
        print()
    print(_summary(f"{host}:{port}", results, time.monotonic() - start))
    return EXIT_OK if results and all(r.ok for r in results) else EXIT_FAILED


async def _run(check: WireGuardCheck, count: int, interval: float, results: list[CheckResult]) -> None:
    for seq in range(1, count + 1):
        started = time.monotonic()
        exchange = await check.probe_exchange()
        results.append(exchange.result)
        target = f"{check.host}:{check.port}"
        line = (format_exchange(seq, target, check.through.target, exchange) if check.through
                else format_result(seq, target, exchange.result))
        print(line, flush=True)
        if seq < count:
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def format_result(seq: int, target: str, result: CheckResult) -> str:
    if result.ok:
        assert result.latency is not None
        note = f" ({result.detail})" if result.detail else ""
        return f"handshake ok from {target}: seq={seq} time={result.latency * 1000:.2f} ms{note}"
    kind = "definitive" if result.definitive else "not definitive"
    return f"handshake FAILED to {target}: seq={seq} {result.error} ({kind}): {result.detail}"


def format_exchange(seq: int, server: str, through: str, exchange: Exchange) -> str:
    """One line per attempt, like ping: the handshake time, the data round trip, the outcome."""
    result = exchange.result
    times = "".join(f" {name}={value * 1000:.2f} ms" for name, value in
                    (("handshake", exchange.handshake_rtt), ("data", exchange.data_rtt)) if value is not None)
    if result.ok:
        return f"tunnel ok to {through} via {server}: seq={seq}{times} sent={exchange.data_sent}"
    kind = "definitive" if result.definitive else "not definitive"
    return f"tunnel FAILED to {through} via {server}: seq={seq}{times} {result.error} ({kind}): {result.detail}"


def _summary(target: str, results: list[CheckResult], elapsed: float) -> str:
    ok = [r.latency for r in results if r.ok and r.latency is not None]
    failed = len(results) - len(ok)
    loss = 100 * failed / len(results) if results else 100
    lines = [
        f"--- {target} wg-probe statistics ---",
        f"{len(results)} sent, {len(ok)} ok, {failed} failed ({loss:.0f}% failed), time {elapsed * 1000:.0f} ms",
    ]
    if ok:
        ms = [x * 1000 for x in ok]
        lines.append(f"rtt min/avg/max = {min(ms):.2f}/{statistics.fmean(ms):.2f}/{max(ms):.2f} ms")
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        lines.append(f"failures: {', '.join(errors)}")
    if "timeout" in errors:
        lines.append(
            "hint: WireGuard answers nothing it cannot authenticate: compare --server-key with "
            "`wg show <interface> public-key` on the server, and check that the probe public key "
            "above is listed by `wg show <interface> peers` there"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
