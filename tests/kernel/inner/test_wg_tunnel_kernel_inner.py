"""Inside the microVM: through the tunnel against the kernel's WireGuard module.

The same tests as tests/netns/test_wireguard_tunnel.py (imported from there, so that both
responders answer to one set of expectations), with a `tunnel` fixture whose server is a
kernel WireGuard interface in a namespace of the guest. Left out: the `pop wg-probe --through`
run (covered on the host).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Netns, cleanup_prefix
from tests.netns.test_wireguard_tunnel import (
    TunnelLab,
    test_echo_to_a_target_beyond_the_server_is_ok,
    test_echo_to_the_servers_tunnel_address_is_ok,
    test_forwarding_off_is_no_data_reply_while_the_handshake_succeeds,
    test_probe_address_outside_the_peers_allowed_ips_is_no_data_reply,
    test_server_without_a_way_to_the_target_answers_target_unreachable,
    test_stopped_server_is_still_icmp_unreachable_with_through,
    test_target_without_a_route_back_is_no_data_reply,
    tunnel_lab,
)

__all__ = [
    "test_echo_to_a_target_beyond_the_server_is_ok",
    "test_echo_to_the_servers_tunnel_address_is_ok",
    "test_forwarding_off_is_no_data_reply_while_the_handshake_succeeds",
    "test_probe_address_outside_the_peers_allowed_ips_is_no_data_reply",
    "test_server_without_a_way_to_the_target_answers_target_unreachable",
    "test_stopped_server_is_still_icmp_unreachable_with_through",
    "test_target_without_a_route_back_is_no_data_reply",
]

PREFIX = "twtk-"


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[TunnelLab]:
    tag = f"{PREFIX}{secrets.token_hex(3)}-"
    created: list[Netns] = []

    def make(name: str) -> Netns:
        created.append(Netns(tag + name))
        return created[-1]

    try:
        # the guest's single emulated CPU is slow: generous waits (the outcomes do not change)
        with tunnel_lab(make, tmp_path, kernel=True, timeout=3.0, data_timeout=1.5) as lab:
            yield lab
    finally:
        for ns in reversed(created):
            ns.close()
        cleanup_prefix(tag)
