"""The WireGuard handshake check without root: primitives, messages, validation, the check.

The primitives are checked against values derived a second, independent way (HMAC spelled
out from its definition, a pure-Python ChaCha20 round function, published constants). The
responder below follows the whitepaper's responder side with those independent primitives
and hard-coded offsets, so it shares no code with pop.checks.noise. The real responder,
wireguard-go, is in tests/netns/test_wireguard_go.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.wireguard import Wireguard, WireguardInitiation, WireguardResponse

from pop.checks import noise
from pop.checks.noise import Initiator, Outcome, Tai64nClock
from pop.checks.wireguard import MIN_GAP_AFTER_ANSWER, Pacer, WireGuardCheck

ZERO12 = bytes(12)
M32 = 0xFFFFFFFF

# --- independent primitives ---------------------------------------------------------------------


def h(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def hmac_ref(key: bytes, data: bytes) -> bytes:
    """RFC 2104 spelled out, with BLAKE2s's 64-byte block."""
    key = key.ljust(64, b"\x00")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


def kdf_ref(n: int, key: bytes, data: bytes) -> list[bytes]:
    prk, out, prev = hmac_ref(key, data), [], b""
    for i in range(1, n + 1):
        prev = hmac_ref(prk, prev + bytes([i]))
        out.append(prev)
    return out


def mac_ref(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & M32


def hchacha20_ref(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 from the ChaCha20 quarter round (RFC 8439 2.1, draft-irtf-cfrg-xchacha 2.2)."""
    s = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]

    def qr(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & M32
        s[d] = _rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & M32
        s[b] = _rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & M32
        s[d] = _rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & M32
        s[b] = _rotl(s[b] ^ s[c], 7)

    for _ in range(10):
        qr(0, 4, 8, 12), qr(1, 5, 9, 13), qr(2, 6, 10, 14), qr(3, 7, 11, 15)
        qr(0, 5, 10, 15), qr(1, 6, 11, 12), qr(2, 7, 8, 13), qr(3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def xseal_ref(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    sub = hchacha20_ref(key, nonce24[:16])
    return ChaCha20Poly1305(sub).encrypt(b"\x00" * 4 + nonce24[16:], plaintext, aad)


def keypair() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    return k.private_bytes_raw(), k.public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


# --- a responder, after the whitepaper (section 5.4.2-5.4.4, 5.4.7) --------------------------------


@dataclass
class Responder:
    private: bytes
    peers: dict[bytes, bytes | None]  # peer public key -> psk
    under_load: bool = False
    cookie: bytes = field(default_factory=lambda: os.urandom(16))
    last_timestamp: dict[bytes, bytes] = field(default_factory=dict)
    consumed: list[tuple[bytes, bytes]] = field(default_factory=list)  # (peer, timestamp)
    # (our index, the initiator's index, receiving key, sending key) of the latest session
    sessions: list[tuple[bytes, bytes, bytes, bytes]] = field(default_factory=list)

    @property
    def public(self) -> bytes:
        return X25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes_raw()

    def answer(self, msg: bytes) -> bytes | None:
        """The response or cookie reply for an initiation, or None where WireGuard is silent."""
        if len(msg) != 148 or msg[:4] != b"\x01\x00\x00\x00":
            return None
        if msg[116:132] != mac_ref(h(b"mac1----", self.public), msg[:116]):
            return None
        sender = msg[4:8]
        if self.under_load and msg[132:148] != mac_ref(self.cookie, msg[:132]):
            nonce = os.urandom(24)
            sealed = xseal_ref(h(b"cookie--", self.public), nonce, self.cookie, msg[116:132])
            return b"\x03\x00\x00\x00" + sender + nonce + sealed
        c = h(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
        hh = h(h(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com"), self.public)
        e_i = msg[8:40]
        (c,) = kdf_ref(1, c, e_i)
        hh = h(hh, e_i)
        c, k = kdf_ref(2, c, dh(self.private, e_i))
        peer = ChaCha20Poly1305(k).decrypt(ZERO12, msg[40:88], hh)
        hh = h(hh, msg[40:88])
        if peer not in self.peers:
            return None
        c, k = kdf_ref(2, c, dh(self.private, peer))
        stamp = ChaCha20Poly1305(k).decrypt(ZERO12, msg[88:116], hh)
        hh = h(hh, msg[88:116])
        if stamp <= self.last_timestamp.get(peer, b""):
            return None  # replay
        self.last_timestamp[peer] = stamp
        self.consumed.append((peer, stamp))
        e_r, e_r_pub = keypair()
        (c,) = kdf_ref(1, c, e_r_pub)
        hh = h(hh, e_r_pub)
        (c,) = kdf_ref(1, c, dh(e_r, e_i))
        (c,) = kdf_ref(1, c, dh(e_r, peer))
        c, tau, k = kdf_ref(3, c, self.peers[peer] or bytes(32))
        hh = h(hh, tau)
        empty = ChaCha20Poly1305(k).encrypt(ZERO12, b"", hh)
        index = os.urandom(4)
        receiving, sending = kdf_ref(2, c, b"")  # 5.4.5: the responder's (T_recv, T_send)
        self.sessions.append((index, sender, receiving, sending))
        body = b"\x02\x00\x00\x00" + index + sender + e_r_pub + empty
        return body + mac_ref(h(b"mac1----", peer), body) + bytes(16)


def remac(resp: bytes, probe_public: bytes) -> bytes:
    """Recompute mac1 after tampering, as an attacker who knows our public key could."""
    return resp[:60] + mac_ref(h(b"mac1----", probe_public), resp[:60]) + resp[76:]


# --- primitives ------------------------------------------------------------------------------------


def test_initial_chaining_key_and_hash_match_published_constants() -> None:
    # boringtun (src/noise/handshake.rs) publishes both precomputed values
    chain = bytes(
        [96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208,
         22, 235, 66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54]
    )  # fmt: skip
    chain_hash = bytes(
        [34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50,
         45, 156, 108, 102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243]
    )  # fmt: skip
    assert noise.hash_(noise.CONSTRUCTION) == chain
    assert noise.hash_(chain, noise.IDENTIFIER) == chain_hash


@given(st.binary(max_size=100), st.binary(max_size=200))
def test_hmac_matches_the_standard_library(key: bytes, data: bytes) -> None:
    assert noise.hmac_blake2s(key, data) == hmac.digest(key, data, "blake2s")


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=200))
def test_hmac_and_kdf_match_rfc2104_spelled_out(key: bytes, data: bytes) -> None:
    assert noise.hmac_blake2s(key, data) == hmac_ref(key, data)
    assert [noise.kdf1(key, data)] == kdf_ref(1, key, data)
    assert list(noise.kdf2(key, data)) == kdf_ref(2, key, data)
    assert list(noise.kdf3(key, data)) == kdf_ref(3, key, data)


def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    assert hchacha20_ref(key, nonce) == expected
    assert noise.hchacha20(key, nonce) == expected


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
def test_hchacha20_from_the_block_function_matches_the_round_function(key: bytes, nonce: bytes) -> None:
    assert noise.hchacha20(key, nonce) == hchacha20_ref(key, nonce)


def test_xaead_opens_what_the_reference_seals() -> None:
    key, nonce, aad = os.urandom(32), os.urandom(24), os.urandom(16)
    assert noise.xaead_decrypt(key, nonce, xseal_ref(key, nonce, b"cookie-sixteen!!", aad), aad) == (
        b"cookie-sixteen!!"
    )


def test_tai64n_encoding() -> None:
    assert noise.tai64n(0) == struct.pack(">QI", 2**62 + 10, 0)
    assert noise.tai64n(1_700_000_000_123_456_789) == struct.pack(">QI", 2**62 + 10 + 1_700_000_000, 123_456_789)


def test_timestamps_increase_across_clock_steps_and_equal_readings() -> None:
    readings = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 4_999_999_999, 9_000_000_000])
    clock = Tai64nClock(lambda: next(readings))
    stamps = [clock.next() for _ in range(5)]
    assert stamps == sorted(set(stamps))  # strictly increasing, bytewise as the responder compares
    assert stamps[-1] == noise.tai64n(9_000_000_000)  # back on the wall clock once it caught up


def test_timestamps_from_the_real_clock_increase() -> None:
    clock = Tai64nClock()
    stamps = [clock.next() for _ in range(1000)]
    assert stamps == sorted(set(stamps))


# --- messages ------------------------------------------------------------------------------------


def test_initiation_layout_agrees_with_scapy() -> None:
    (probe, _), (_, server) = keypair(), keypair()
    msg, hs = Initiator(probe, server).initiation(0xDEADBEEF, noise.tai64n(time.time_ns()))
    pkt = Wireguard(msg)
    assert pkt.message_type == 1 and pkt.reserved_zero == 0
    init = pkt[WireguardInitiation]
    assert init.sender_index == 0xDEADBEEF == hs.sender_index
    assert init.mac1 == hs.mac1 == mac_ref(h(b"mac1----", server), msg[:116])
    assert init.mac2 == bytes(16)
    rebuilt = Wireguard() / WireguardInitiation(
        sender_index=init.sender_index,
        unencrypted_ephemeral=init.unencrypted_ephemeral,
        encrypted_static=init.encrypted_static,
        encrypted_timestamp=init.encrypted_timestamp,
        mac1=init.mac1,
        mac2=init.mac2,
    )
    assert bytes(rebuilt) == msg


def test_mac2_is_keyed_by_the_cookie() -> None:
    (probe, _), (_, server) = keypair(), keypair()
    cookie = os.urandom(16)
    msg, _ = Initiator(probe, server).initiation(1, noise.tai64n(1), cookie)
    assert msg[132:] == mac_ref(cookie, msg[:132])


@dataclass
class Pair:
    probe: bytes
    probe_pub: bytes
    responder: Responder
    initiator: Initiator


def pair(server_psk: bytes | None = None, probe_psk: bytes | None = None) -> Pair:
    probe, probe_pub = keypair()
    server, server_pub = keypair()
    responder = Responder(server, {probe_pub: server_psk})
    return Pair(probe, probe_pub, responder, Initiator(probe, server_pub, probe_psk))


def exchange(p: Pair, index: int = 7) -> tuple[bytes, noise.Handshake]:
    stamp = noise.tai64n(time.time_ns())
    msg, hs = p.initiator.initiation(index, stamp)
    resp = p.responder.answer(msg)
    assert resp is not None
    assert p.responder.consumed[-1] == (p.probe_pub, stamp)  # it decrypted our static key and timestamp
    return resp, hs


def test_valid_response_validates() -> None:
    p = pair()
    resp, hs = exchange(p)
    assert hs.validate(resp) == noise.VALID
    assert WireguardResponse in Wireguard(resp)  # and scapy reads it as a response


def test_valid_response_with_psk_validates() -> None:
    psk = os.urandom(32)
    resp, hs = exchange(pair(psk, psk))
    assert hs.validate(resp) == noise.VALID


@pytest.mark.parametrize(
    ("server_psk", "probe_psk", "why"),
    [
        (os.urandom(32), None, "none was given"),
        (None, os.urandom(32), "server has no preshared key"),
        (os.urandom(32), os.urandom(32), "differs"),
    ],
)
def test_psk_mismatch_is_told_apart(server_psk: bytes | None, probe_psk: bytes | None, why: str) -> None:
    resp, hs = exchange(pair(server_psk, probe_psk))
    verdict = hs.validate(resp)
    assert verdict.outcome is Outcome.PSK_MISMATCH
    assert why in verdict.detail


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("offset", "outcome", "why"),
    [
        (0, Outcome.BAD_RESPONSE, "unexpected datagram"),  # message type 2 -> 3 with a 92-byte length
        (1, Outcome.BAD_RESPONSE, "reserved"),
        (4, Outcome.BAD_RESPONSE, "mac1"),  # responder's sender index
        (8, Outcome.FOREIGN, ""),  # receiver index: not an answer to this initiation
        (12, Outcome.BAD_RESPONSE, "mac1"),  # ephemeral
        (44, Outcome.BAD_RESPONSE, "mac1"),  # encrypted empty payload
        (60, Outcome.BAD_RESPONSE, "mac1"),
        (76, Outcome.BAD_RESPONSE, "mac2"),
    ],
)
def test_every_tampered_field_is_rejected(offset: int, outcome: Outcome, why: str) -> None:
    resp, hs = exchange(pair())
    verdict = hs.validate(_flip(resp, offset))
    assert verdict.outcome is outcome
    assert why in verdict.detail


@pytest.mark.parametrize("offset", [12, 44])
def test_tampering_that_keeps_mac1_valid_fails_the_dh_chain(offset: int) -> None:
    p = pair()
    resp, hs = exchange(p)
    verdict = hs.validate(remac(_flip(resp, offset), p.probe_pub))
    # mac1 is keyed by a public key, so an intact-looking reply that fails the AEAD reads as a
    # PSK mismatch: still a definitive failure, never a success
    assert verdict.outcome is Outcome.PSK_MISMATCH


def test_low_order_ephemeral_is_rejected() -> None:
    p = pair()
    resp, hs = exchange(p)
    verdict = hs.validate(remac(resp[:12] + bytes(32) + resp[44:], p.probe_pub))
    assert verdict.outcome is Outcome.BAD_RESPONSE and "low-order" in verdict.detail


@pytest.mark.parametrize("data", [b"", b"\x02", bytes(91), b"\x04" + bytes(91), b"\x01" + bytes(147)])
def test_junk_is_a_bad_response(data: bytes) -> None:
    _, hs = exchange(pair())
    assert hs.validate(data).outcome is Outcome.BAD_RESPONSE


def test_cookie_reply_is_opened_and_bound_to_our_mac1() -> None:
    p = pair()
    p.responder.under_load = True
    msg, hs = p.initiator.initiation(9, noise.tai64n(time.time_ns()))
    reply = p.responder.answer(msg)
    assert reply is not None and len(reply) == 64
    verdict = hs.validate(reply)
    assert verdict.outcome is Outcome.COOKIE and verdict.cookie == p.responder.cookie
    assert hs.validate(_flip(reply, 40)).outcome is Outcome.BAD_RESPONSE  # sealed cookie
    assert hs.validate(_flip(reply, 4)).outcome is Outcome.FOREIGN
    _, other = p.initiator.initiation(9, noise.tai64n(time.time_ns()))
    assert other.validate(reply).outcome is Outcome.BAD_RESPONSE  # AD is the other message's mac1
    # and the retry with mac2 gets through the loaded responder
    retry, hs2 = p.initiator.initiation(10, noise.tai64n(time.time_ns()), verdict.cookie)
    resp = p.responder.answer(retry)
    assert resp is not None and hs2.validate(resp) == noise.VALID


def test_bad_keys_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="low-order"):
        Initiator(os.urandom(32), bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        Initiator(os.urandom(31), os.urandom(32))
    with pytest.raises(ValueError, match="preshared"):
        Initiator(os.urandom(32), keypair()[1], b"short")


# --- the check, against a responder on 127.0.0.1 ---------------------------------------------------


class _Server(asyncio.DatagramProtocol):
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.arrivals: list[float] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrivals.append(time.monotonic())
        assert self.transport is not None and callable(self.answer)
        for reply in self.answer(data):
            self.transport.sendto(reply, addr)


async def serve(answer: object, host: str = "127.0.0.1") -> tuple[_Server, int]:
    loop = asyncio.get_running_loop()
    server = _Server(answer)
    await loop.create_datagram_endpoint(lambda: server, local_addr=(host, 0))
    assert server.transport is not None
    return server, server.transport.get_extra_info("sockname")[1]


def one(responder: Responder) -> object:
    def answer(data: bytes) -> list[bytes]:
        reply = responder.answer(data)
        return [] if reply is None else [reply]

    return answer


def check_for(p: Pair, port: int, psk: bytes | None = None, timeout: float = 2.0) -> WireGuardCheck:
    return WireGuardCheck("127.0.0.1", port, p.responder.public, p.probe, psk=psk, timeout=timeout)


def test_check_succeeds_and_reports_rtt() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(one(p.responder))
        check = check_for(p, port)
        assert (check.name, check.tier) == ("wireguard", 2)
        results = [await check.probe() for _ in range(3)]
        server.transport.close()
        assert all(r.ok and r.latency is not None and 0 < r.latency < 2.0 for r in results), results
        assert len(p.responder.consumed) == 3

    asyncio.run(main())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="needs IPv6 on loopback (::1)")
def test_check_over_ipv6() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(one(p.responder), host="::1")
        result = await WireGuardCheck("::1", port, p.responder.public, p.probe, timeout=2.0).probe()
        server.transport.close()
        assert result.ok, result

    asyncio.run(main())


def test_check_resolves_names() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(one(p.responder))
        result = await WireGuardCheck("localhost", port, p.responder.public, p.probe, timeout=2.0).probe()
        server.transport.close()
        # localhost may resolve to ::1 first, where nothing listens: then the kernel says so
        assert result.ok or result.error == "icmp-unreachable", result

    asyncio.run(main())


def test_check_spaces_initiations_to_one_responder() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(one(p.responder))
        a, b = check_for(p, port), check_for(p, port)  # two objects, one key and responder
        results = await asyncio.gather(a.probe(), b.probe(), a.probe())
        server.transport.close()
        assert all(r.ok for r in results), results
        gaps = [y - x for x, y in itertools.pairwise(server.arrivals)]
        # the responder's rule is 20 ms; the rest of the interval absorbs scheduling jitter
        assert len(gaps) == 2 and min(gaps) > 0.020, gaps

    asyncio.run(main())


class _Late(_Server):
    """Answers `delay` seconds late, and not at all to the datagrams numbered in `drop`."""

    def __init__(self, answer: object, delay: float, drop: frozenset[int] = frozenset()) -> None:
        super().__init__(answer)
        self.delay, self.drop = delay, drop
        self.answers: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) - 1 in self.drop:
            return
        assert callable(self.answer)
        for reply in self.answer(data):
            asyncio.get_running_loop().call_later(self.delay, self._send, reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        self.answers.append(time.monotonic())
        self.transport.sendto(reply, addr)


async def serve_late(p: Pair, delay: float, drop: frozenset[int] = frozenset()) -> tuple[_Late, int]:
    loop = asyncio.get_running_loop()
    server = _Late(one(p.responder), delay, drop)
    await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    return server, server.transport.get_extra_info("sockname")[1]


def test_a_slow_responder_has_one_initiation_in_flight() -> None:
    """A responder that answers late consumes late: the next initiation waits for the answer."""

    async def main() -> None:
        p = pair()
        server, port = await serve_late(p, delay=0.060)
        results = await asyncio.gather(*(check_for(p, port).probe() for _ in range(3)))
        server.transport.close()
        assert all(r.ok for r in results), results
        # every send after the first follows the previous answer by the responder's 20 ms
        follows = [arrival - answer for answer, arrival in zip(server.answers, server.arrivals[1:], strict=False)]
        assert len(server.arrivals) == 3 and min(follows) > 0.020, (server.arrivals, server.answers)

    asyncio.run(main())


def test_an_unanswered_initiation_holds_the_responder_for_its_timeout() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve_late(p, delay=0.0, drop=frozenset({0}))
        first, second = await asyncio.gather(check_for(p, port, timeout=0.1).probe(), check_for(p, port).probe())
        server.transport.close()
        assert (first.ok, first.error, second.ok) == (False, "timeout", True), (first, second)
        # the second went out only after the first's answer timeout (the extra 25 ms of the hold
        # absorbs how late the server's loop noted the first arrival)
        assert server.arrivals[1] - server.arrivals[0] >= 0.1, server.arrivals

    asyncio.run(main())


def test_pacer_claims_and_answers() -> None:
    pacer = Pacer()
    assert pacer.claim(1.0) == 0  # claimed, held for a second
    assert pacer.claim(1.0) == pytest.approx(1.0, abs=0.01)
    pacer.answered()
    assert pacer.claim(1.0) == pytest.approx(MIN_GAP_AFTER_ANSWER, abs=0.005)
    time.sleep(MIN_GAP_AFTER_ANSWER)
    assert pacer.claim(1.0) == 0


def test_wrong_server_key_is_a_timeout_with_a_hint() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(one(p.responder))
        check = WireGuardCheck("127.0.0.1", port, keypair()[1], p.probe, timeout=0.2)
        result = await check.probe()
        server.transport.close()
        assert (result.ok, result.error, result.definitive) == (False, "timeout", False)
        assert "wrong server public key" in result.detail
        assert server.arrivals  # it did send

    asyncio.run(main())


def test_closed_port_is_icmp_unreachable_and_definitive() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = pair()
    result = asyncio.run(check_for(p, port).probe())
    assert (result.ok, result.error, result.definitive) == (False, "icmp-unreachable", True)
    assert str(port) in result.detail


def test_psk_mismatch_is_definitive() -> None:
    async def main() -> None:
        p = pair(server_psk=os.urandom(32))
        server, port = await serve(one(p.responder))
        result = await check_for(p, port).probe()
        server.transport.close()
        assert (result.error, result.definitive) == ("psk-mismatch", True)

    asyncio.run(main())


def test_cookie_reply_then_success_with_mac2() -> None:
    async def main() -> None:
        p = pair()
        p.responder.under_load = True
        server, port = await serve(one(p.responder))
        result = await check_for(p, port).probe()
        server.transport.close()
        assert result.ok and "cookie" in result.detail
        assert len(server.arrivals) == 2 and len(p.responder.consumed) == 1

    asyncio.run(main())


def test_cookie_replies_only_is_a_cookie_failure() -> None:
    async def main() -> None:
        p = pair()
        p.responder.under_load = True

        def answer(data: bytes) -> list[bytes]:
            reply = p.responder.answer(data)
            p.responder.cookie = os.urandom(16)  # its secret rotates: our mac2 never matches
            return [] if reply is None else [reply]

        server, port = await serve(answer)
        result = await check_for(p, port).probe()
        server.transport.close()
        assert (result.ok, result.error, result.definitive) == (False, "cookie", False)

    asyncio.run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        lambda data: b"hello",
        lambda data: b"\x02\x00\x00\x00" + bytes(4) + data[4:8] + bytes(80),  # ours, but all zeros
    ],
)
def test_garbage_answer_is_a_bad_response(garbage: Any) -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(lambda data: [garbage(data)])
        result = await check_for(p, port).probe()
        server.transport.close()
        assert (result.error, result.definitive) == ("bad-response", True), result

    asyncio.run(main())


def test_answers_to_other_handshakes_are_ignored() -> None:
    async def main() -> None:
        p = pair()

        def answer(data: bytes) -> list[bytes]:
            reply = p.responder.answer(data)
            assert reply is not None
            stale = reply[:8] + bytes(4) + reply[12:]  # receiver index 0: someone else's
            return [stale, reply]

        server, port = await serve(answer)
        result = await check_for(p, port).probe()
        server.transport.close()
        assert result.ok, result

    asyncio.run(main())


def test_probe_is_cancellable_and_leaks_no_socket() -> None:
    async def main() -> None:
        p = pair()
        server, port = await serve(lambda data: [])
        task = asyncio.create_task(check_for(p, port, timeout=5).probe())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.transport.close()

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before  # (ResourceWarning would fail the test too)
