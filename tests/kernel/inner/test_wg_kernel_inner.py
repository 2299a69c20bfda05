"""Inside the microVM: the handshake check against the kernel's WireGuard module.

The same tests as tests/netns/test_wireguard_go.py (imported from there, so that both
responders answer to one set of expectations), with a `lab` fixture whose server is a kernel
WireGuard interface (`ip link add ... type wireguard`, configured with `wg`) in a namespace
of the guest. Left out: the timing-sensitive negative control for the rate limit (5 ms gaps
mean little on an emulated CPU) and the `pop wg-probe` runs (covered on the host).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Netns, cleanup_prefix, veth
from lab.wgserver import WireGuardServer
from tests.netns.test_wireguard_go import (
    CLIENT_IP,
    PORT,
    SERVER_IP,
    Lab,
    probe_key,
    test_closed_port_is_icmp_unreachable,
    test_cookie_reply_under_load_then_success_with_mac2,
    test_probe_key_unknown_to_the_server_is_silence,
    test_psk_mismatch_is_reported_as_such,
    test_psk_on_both_sides_succeeds,
    test_rapid_probes_respect_the_per_peer_rate_limit,
    test_replayed_timestamp_is_silence,
    test_right_key_succeeds_with_rtt,
    test_server_stopped_mid_run_fails_after_success,
    test_wrong_server_key_is_silence,
)

__all__ = [
    "probe_key",
    "test_closed_port_is_icmp_unreachable",
    "test_cookie_reply_under_load_then_success_with_mac2",
    "test_probe_key_unknown_to_the_server_is_silence",
    "test_psk_mismatch_is_reported_as_such",
    "test_psk_on_both_sides_succeeds",
    "test_rapid_probes_respect_the_per_peer_rate_limit",
    "test_replayed_timestamp_is_silence",
    "test_right_key_succeeds_with_rtt",
    "test_server_stopped_mid_run_fails_after_success",
    "test_wrong_server_key_is_silence",
]

PREFIX = "twgk-"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = f"{PREFIX}{secrets.token_hex(3)}-"
    server_ns, client_ns = Netns(tag + "s"), Netns(tag + "c")
    try:
        veth(server_ns, "twgk-s", f"{SERVER_IP}/24", client_ns, "twgk-c", f"{CLIENT_IP}/24")
        server = WireGuardServer(server_ns, "wgk0", tmp_path, PORT, kernel=True)
        server.start()
        # the kernel's queue threshold is 512; the guest's single emulated CPU is slow
        yield Lab(server, client_ns, timeout=3.0, flood=1500)
    finally:
        server_ns.close()
        client_ns.close()
        cleanup_prefix(tag)
