"""Through the tunnel without root: transport messages, the inner echo, the judge, the check.

The responder side is the independent one of tests/unit/test_wireguard.py (its own KDF, its
own offsets), extended by its transport keys; inner packets are built and read with scapy,
which pop.checks.tunnel uses only for its template. The real responders (wireguard-go, the
kernel module) are in tests/netns/test_wireguard_tunnel.py and its microVM twin.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from scapy.layers.inet import ICMP, IP, UDP, ICMPerror, IPerror
from scapy.packet import Raw

from pop import config as pop_config
from pop.checks import noise
from pop.checks.tunnel import PAYLOAD, BadData, Echo, Reply, Session, internet_checksum
from pop.checks.wireguard import DATA_SENDS, WireGuardCheck
from tests.unit.test_wireguard import Pair, exchange, pair, serve

PROBE, TARGET, SERVER = "10.255.255.1", "10.8.255.1", "10.255.0.1"


def nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "little")


def data_message(receiver: bytes, counter: int, key: bytes, packet: bytes) -> bytes:
    """A transport data message as the whitepaper (5.4.6) lays it out, padded to 16."""
    padded = packet + bytes(-len(packet) % 16)
    return b"\x04\x00\x00\x00" + receiver + counter.to_bytes(8, "little") + ChaCha20Poly1305(key).encrypt(
        nonce(counter), padded, None)


def session_with(p: Pair) -> tuple[Session, tuple[bytes, bytes, bytes, bytes]]:
    resp, hs = exchange(p)
    assert hs.validate(resp) == noise.VALID
    return Session.of(hs), p.responder.sessions[-1]


# --- transport messages ----------------------------------------------------------------------


@pytest.mark.parametrize("psk", [None, os.urandom(32)])
def test_what_we_seal_the_responder_opens_with_its_own_keys(psk: bytes | None) -> None:
    session, (index, initiator, receiving, _) = session_with(pair(psk, psk))
    packet = Echo(PROBE, TARGET).request(0x1234, 7)
    first, second = session.seal(packet), session.seal(packet)
    for counter, message in enumerate((first, second)):
        assert message[:4] == b"\x04\x00\x00\x00" and message[4:8] == index
        assert struct.unpack_from("<Q", message, 8)[0] == counter
        plain = ChaCha20Poly1305(receiving).decrypt(nonce(counter), message[16:], None)
        assert len(plain) % 16 == 0 and plain[:len(packet)] == packet and not plain[len(packet):].strip(b"\0")
    assert initiator == session.local_index.to_bytes(4, "little")


def test_what_the_responder_seals_we_open_once() -> None:
    session, (_, initiator, _, sending) = session_with(pair())
    message = data_message(initiator, 0, sending, b"hello")
    assert session.open(message) == b"hello" + bytes(11)
    assert session.open(message) is None  # a replayed counter is ignored, not an error
    assert session.open(data_message(initiator, 1, sending, b"")) == b""  # a keepalive


def test_a_data_message_for_another_session_is_ignored() -> None:
    session, (_, _, _, sending) = session_with(pair())
    assert session.open(data_message(b"\xff\xff\xff\xff", 0, sending, b"x")) is None
    assert session.open(b"\x02" + bytes(91)) is None


@pytest.mark.parametrize("tamper", ["tag", "counter", "reserved", "key"])
def test_a_forged_data_message_addressed_to_us_is_bad_data(tamper: str) -> None:
    session, (_, initiator, _, sending) = session_with(pair())
    message = bytearray(data_message(initiator, 0, sending if tamper != "key" else os.urandom(32), b"x" * 20))
    if tamper == "tag":
        message[-1] ^= 1
    elif tamper == "counter":
        message[8] ^= 1
    elif tamper == "reserved":
        message[2] = 1
    with pytest.raises(BadData):
        session.open(bytes(message))


def test_no_session_without_a_valid_response() -> None:
    _, hs = exchange(pair())
    with pytest.raises(ValueError, match="no valid response"):
        Session.of(hs)


# --- the inner packet ------------------------------------------------------------------------


def test_echo_request_is_what_scapy_builds() -> None:
    raw = Echo(PROBE, TARGET).request(0xBEEF, 0x0102)
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.proto, pkt[ICMP].type, pkt[ICMP].id, pkt[ICMP].seq) == (
        PROBE, TARGET, 1, 8, 0xBEEF, 0x0102)
    assert bytes(pkt[Raw]) == PAYLOAD
    rebuilt = IP(raw)
    del rebuilt.chksum, rebuilt[ICMP].chksum
    assert bytes(rebuilt) == raw  # both checksums are right


def test_internet_checksum_of_odd_length() -> None:
    assert internet_checksum(b"\x01") == ~0x0100 & 0xFFFF


def reply(src: str = TARGET, dst: str = PROBE, ident: int = 9, seq: int = 5, payload: bytes = PAYLOAD) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=0, id=ident, seq=seq) / payload)


def unreachable(code: int, quoted_ident: int = 9, quoted_dst: str = TARGET, src: str = SERVER) -> bytes:
    request = IP(Echo(PROBE, quoted_dst).request(quoted_ident, 5))
    return bytes(IP(src=src, dst=PROBE) / ICMP(type=3, code=code) / bytes(request)[:28])


SEQS = range(5, 8)


@pytest.mark.parametrize(("packet", "expected", "detail"), [
    (reply(), Reply.OK, ""),
    (reply() + bytes(12), Reply.OK, ""),  # WireGuard's padding after the IP packet
    (reply(seq=7), Reply.OK, ""),
    (b"", Reply.KEEPALIVE, ""),
    (reply(seq=8), Reply.BAD_REPLY, "seq 8"),
    (reply(ident=10), Reply.BAD_REPLY, "id 10"),
    (reply(src="10.8.255.2"), Reply.BAD_REPLY, "from 10.8.255.2, not from the target"),
    (reply(dst="10.255.255.2"), Reply.BAD_REPLY, "not for the probe's tunnel address"),
    (reply(payload=b"something else!!"), Reply.BAD_REPLY, "another payload"),
    (reply()[:30], Reply.BAD_REPLY, "truncated"),
    (b"\x60" + bytes(47), Reply.BAD_REPLY, "not an IPv4 packet"),
    (bytes(IP(src=TARGET, dst=PROBE) / UDP(sport=53, dport=53) / b"x"), Reply.BAD_REPLY, "protocol 17"),
    (bytes(IP(src=TARGET, dst=PROBE) / ICMP(type=8, id=9, seq=5)), Reply.BAD_REPLY, "ICMP type 8"),
    (unreachable(0), Reply.UNREACHABLE, "network unreachable for 10.8.255.1, from 10.255.0.1"),
    (unreachable(1), Reply.UNREACHABLE, "host unreachable"),
    (unreachable(13), Reply.UNREACHABLE, "administratively prohibited"),
    (bytes(IP(src=SERVER, dst=PROBE) / ICMP(type=11) / bytes(IP(Echo(PROBE, TARGET).request(9, 5)))[:28]),
     Reply.UNREACHABLE, "time exceeded"),
    (unreachable(1, quoted_ident=10), Reply.FOREIGN, ""),
    (unreachable(1, quoted_dst="10.8.255.9"), Reply.FOREIGN, ""),
])
def test_judge(packet: bytes, expected: Reply, detail: str) -> None:
    judged = Echo(PROBE, TARGET).judge(packet, 9, SEQS)
    assert judged.reply is expected, judged
    assert detail in judged.detail


def test_scapy_reads_our_unreachable_fixture_as_an_icmp_error() -> None:
    pkt = IP(unreachable(1))
    assert pkt[ICMP].type == 3 and pkt[IPerror].dst == TARGET and pkt[ICMPerror].id == 9


def test_ipv6_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="IPv4 only"):
        Echo("fd00::1", TARGET)


# --- the check against a loopback responder ----------------------------------------------------


def tunnel_server(p: Pair, inner: Callable[[IP], bytes | None]) -> Callable[[bytes], list[bytes]]:
    """A responder that also opens data messages and answers the inner packet with `inner`."""
    counter = iter(range(1 << 20))

    def answer(data: bytes) -> list[bytes]:
        if data[0] == 1:
            reply_ = p.responder.answer(data)
            return [] if reply_ is None else [reply_]
        index, initiator, receiving, sending = p.responder.sessions[-1]
        assert data[0] == 4 and data[4:8] == index
        plain = ChaCha20Poly1305(receiving).decrypt(nonce(struct.unpack_from("<Q", data, 8)[0]),
                                                    data[16:], None)
        answer_ = inner(IP(plain))
        return [] if answer_ is None else [data_message(initiator, next(counter), sending, answer_)]

    return answer


def echo_reply(pkt: IP) -> bytes:
    return bytes(IP(src=pkt.dst, dst=pkt.src) / ICMP(type=0, id=pkt[ICMP].id, seq=pkt[ICMP].seq) / pkt[Raw].load)


def run_check(inner: Callable[[IP], bytes | None], data_timeout: float = 0.3) -> tuple[object, list[float]]:
    async def main() -> tuple[object, list[float]]:
        p = pair()
        server, port = await serve(tunnel_server(p, inner))
        check = WireGuardCheck("127.0.0.1", port, p.responder.public, p.probe, timeout=1.0,
                               through=Echo(PROBE, TARGET), data_timeout=data_timeout)
        try:
            return await check.probe_exchange(), server.arrivals
        finally:
            server.transport.close()

    return asyncio.run(main())


def test_echo_reply_through_the_tunnel_is_ok_with_both_round_trips() -> None:
    exchange_, arrivals = run_check(echo_reply)
    result = exchange_.result
    assert result.ok and exchange_.data_rtt is not None and exchange_.handshake_rtt is not None, exchange_
    assert result.latency == pytest.approx(exchange_.handshake_rtt + exchange_.data_rtt)
    assert f"through {TARGET}" in result.detail and exchange_.data_sent == 1
    assert len(arrivals) == 2  # one initiation, one data message


def test_silence_after_the_handshake_is_no_data_reply_after_every_send() -> None:
    start = time.monotonic()
    exchange_, arrivals = run_check(lambda pkt: None, data_timeout=0.3)
    elapsed = time.monotonic() - start
    result = exchange_.result
    assert (result.ok, result.error, result.definitive) == (False, "no-data-reply", True), result
    assert "alive but useless" in result.detail and exchange_.handshake_rtt is not None
    assert len(arrivals) == 1 + DATA_SENDS and exchange_.data_sent == DATA_SENDS
    # the sends are spread over the wait, so that one burst of loss cannot take all of them
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:])]
    assert all(g > 0.05 for g in gaps), gaps
    assert elapsed < 1.0


def test_one_lost_data_message_is_made_up_by_the_next_send() -> None:
    seen: list[int] = []

    def lossy(pkt: IP) -> bytes | None:
        seen.append(pkt[ICMP].seq)
        return None if len(seen) == 1 else echo_reply(pkt)

    exchange_, _ = run_check(lossy)
    assert exchange_.result.ok and exchange_.data_sent == 2, exchange_


def test_icmp_unreachable_from_inside_the_tunnel_is_definitive() -> None:
    def refuse(pkt: IP) -> bytes:
        return bytes(IP(src=SERVER, dst=pkt.src) / ICMP(type=3, code=0) / bytes(pkt)[:28])

    result = run_check(refuse)[0].result
    assert (result.ok, result.error, result.definitive) == (False, "target-unreachable", True), result
    assert "network unreachable" in result.detail


def test_a_wrong_inner_reply_is_bad_data_reply() -> None:
    def wrong(pkt: IP) -> bytes:
        return bytes(IP(src="192.0.2.9", dst=pkt.src) / ICMP(type=0, id=pkt[ICMP].id, seq=pkt[ICMP].seq) / PAYLOAD)

    result = run_check(wrong)[0].result
    assert (result.ok, result.error, result.definitive) == (False, "bad-data-reply", True), result
    assert "192.0.2.9" in result.detail


# --- configuration -----------------------------------------------------------------------------


def _config(**wireguard: object) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "examples" / "pop.yaml").read_text()
    document = yaml.safe_load(text)
    document["checks"]["wireguard"].update(wireguard)
    return yaml.safe_dump(document)


def test_through_and_tunnel_address_are_read() -> None:
    wg = pop_config.load(_config(through="10.8.255.1", tunnel_address="10.255.255.1", data_timeout=0.5)).checks.wireguard
    assert (wg.through, wg.tunnel_address, wg.data_timeout) == ("10.8.255.1", "10.255.255.1", 0.5)
    assert pop_config.load(_config()).checks.wireguard.through is None


@pytest.mark.parametrize(("keys", "problem"), [
    ({"through": "10.8.255.1"}, "checks.wireguard.tunnel_address: required with through"),
    ({"through": "2001:db8::1", "tunnel_address": "10.255.255.1"}, "checks.wireguard.through: 2001:db8::1 is IPv6"),
    ({"through": "10.8.255.1", "tunnel_address": "probe"}, "checks.wireguard.tunnel_address: 'probe' is not an IP"),
    ({"through": "10.8.255.1", "tunnel_address": "10.255.255.1", "data_timeout": 0},
     "checks.wireguard.data_timeout"),
])
def test_bad_tunnel_keys_are_named(keys: dict[str, object], problem: str) -> None:
    with pytest.raises(pop_config.ConfigError) as caught:
        pop_config.load(_config(**keys), "pop.yaml")
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_a_concurrent_probe_of_the_same_key_waits_for_the_data_exchange() -> None:
    """A second handshake mid-exchange would give the responder a newer session for our key."""
    kinds: list[int] = []

    async def main() -> list[object]:
        p = pair()
        answer = tunnel_server(p, lambda pkt: None)

        def recording(data: bytes) -> list[bytes]:
            kinds.append(data[0])
            return answer(data)

        server, port = await serve(recording)
        check = WireGuardCheck("127.0.0.1", port, p.responder.public, p.probe, timeout=1.0,
                               through=Echo(PROBE, TARGET), data_timeout=0.15)
        try:
            return list(await asyncio.gather(check.probe(), check.probe()))
        finally:
            server.transport.close()

    results = asyncio.run(main())
    assert [r.error for r in results] == ["no-data-reply"] * 2, results  # type: ignore[attr-defined]
    assert kinds == [1, 4, 4, 4, 1, 4, 4, 4], kinds
