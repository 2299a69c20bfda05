"""WireGuard's Noise_IKpsk2 handshake, initiator side only: pure message building and validation.

Contract: `Initiator(probe_private_key, server_public_key, psk)` holds everything that is fixed
for one probe key and one responder (the static-static DH, the hash of the responder's key,
the MAC keys). `Initiator.initiation(sender_index, timestamp, cookie)` returns the 148-byte
handshake initiation and a `Handshake` whose `validate(datagram)` returns a `Verdict` for
whatever came back: a valid response, a cookie reply (with the decrypted cookie), a datagram
meant for another handshake, or the precise reason the response is invalid. No I/O: the
caller supplies the sender index and the TAI64N timestamp (from a `Tai64nClock`, the one
stateful piece here). After a valid response the handshake also knows the responder's index
and, on demand, the session's transport keys (`transport_keys()`, for pop.checks.tunnel).

The wire layout is taken from scapy's WireGuard layers (scapy.contrib.wireguard) once at
import; the hot path packs and unpacks with `struct`, because building an initiation and
parsing a response with scapy costs about 0.3-0.45 ms, as much as the whole cryptographic
work of a handshake (bench/wg_probe.py).

Protocol reference: the WireGuard whitepaper, section 5.4 (messages, MACs and cookies).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from scapy.contrib.wireguard import (
    Wireguard,
    WireguardCookieReply,
    WireguardInitiation,
    WireguardResponse,
)
from scapy.fields import ByteEnumField, StrFixedLenField, ThreeBytesField

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32
ZERO_KEY = bytes(KEY_LEN)
_ZERO_NONCE = bytes(12)
_ZERO_MAC = bytes(16)

# TAI64 labels count from 2^62; WireGuard (kernel and wireguard-go) adds the 10 s TAI-UTC offset.
TAI64_BASE = 0x400000000000000A

TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_COOKIE_REPLY = 3


def _wire_struct(*layers: Any, until: str | None = None) -> tuple[struct.Struct, dict[str, int]]:
    """A little-endian struct and the field offsets for a stack of scapy layers."""
    fmt, offset = "<", 0
    offsets: dict[str, int] = {}
    for layer in layers:
        for fld in layer.fields_desc:
            if fld.name == until:
                return struct.Struct(fmt), offsets
            code = _field_code(fld)
            offsets[fld.name] = offset
            fmt += code
            offset += struct.calcsize("<" + code)
    return struct.Struct(fmt), offsets


def _field_code(fld: Any) -> str:
    if isinstance(fld, StrFixedLenField):
        return f"{fld.sz}s"
    if isinstance(fld, ThreeBytesField):
        return "3s"  # the reserved zeros: compared as bytes
    if isinstance(fld, ByteEnumField):
        return "B"
    if fld.fmt == "<I":
        return "I"
    raise TypeError(f"scapy field {fld.name} has no fixed little-endian layout")


INITIATION, INITIATION_OFFSETS = _wire_struct(Wireguard, WireguardInitiation)
_INITIATION_BODY, _ = _wire_struct(Wireguard, WireguardInitiation, until="mac1")
RESPONSE, RESPONSE_OFFSETS = _wire_struct(Wireguard, WireguardResponse)
COOKIE_REPLY, COOKIE_REPLY_OFFSETS = _wire_struct(Wireguard, WireguardCookieReply)
MAC1_OFFSET = INITIATION_OFFSETS["mac1"]
RESPONSE_MAC1_OFFSET = RESPONSE_OFFSETS["mac1"]
assert (INITIATION.size, RESPONSE.size, COOKIE_REPLY.size) == (148, 92, 64)
assert _INITIATION_BODY.size == MAC1_OFFSET == 116

_RESERVED = b"\x00\x00\x00"


# --- the primitives of section 5.4 -------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


_BLOCK = 64  # BLAKE2s block size, the HMAC block size
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_blake2s = hashlib.blake2s


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2s.

    Spelled out because hmac.digest(..., "blake2s") goes through OpenSSL's by-name digest
    lookup and costs 3.7 times as much; a handshake computes 18 of them.
    """
    if len(key) > _BLOCK:
        key = _blake2s(key).digest()
    fill = _BLOCK - len(key)
    inner = _blake2s(key.translate(_IPAD))
    inner.update(b"\x36" * fill)
    inner.update(data)
    outer = _blake2s(key.translate(_OPAD))
    outer.update(b"\x5c" * fill)
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    return hmac_blake2s(hmac_blake2s(key, data), b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    return t1, hmac_blake2s(prk, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2, hmac_blake2s(prk, t2 + b"\x03")


_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 from the ChaCha20 block function that `cryptography` exposes.

    A ChaCha20 keystream block is permute(state) + state, word by word; HChaCha20 is
    permute(state) without the addition, words 0-3 and 12-15. `cryptography`'s 16-byte ChaCha20
    nonce fills words 12-15 exactly as HChaCha20's nonce does, so subtracting the known words
    of the initial state from the keystream recovers HChaCha20.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    tail = struct.unpack("<4I", nonce16)
    return struct.pack(
        "<8I",
        *((words[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)),
        *((words[12 + i] - tail[i]) & 0xFFFFFFFF for i in range(4)),
    )


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 open (raises InvalidTag), which the cookie reply uses."""
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).decrypt(b"\x00\x00\x00\x00" + nonce24[16:], ciphertext, aad)


def public_key(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def tai64n(unix_ns: int) -> bytes:
    seconds, nanoseconds = divmod(unix_ns, 1_000_000_000)
    return struct.pack(">QI", TAI64_BASE + seconds, nanoseconds)


class Tai64nClock:
    """Strictly increasing TAI64N timestamps for one probe key.

    A responder drops an initiation whose timestamp is not greater than the last one it
    accepted from that peer, and keeps that value for as long as the peer is configured.
    Each timestamp is the wall clock in nanoseconds, but never less than the previous one
    plus 1 ns: several probes in one process stay ordered, and a backwards clock step in a
    running process cannot make the responder drop us. Nothing is persisted, so after a
    backwards step *and* a restart the responder drops initiations until the wall clock
    passes the last timestamp it accepted (start pop after the clock is synchronised).
    Using the wall clock, rather than a private counter, keeps the daemon and a
    `pop wg-probe` run by hand with the same key interleaving correctly. Full nanosecond
    resolution is kept (WireGuard clients round to ~16 ms to hide their clock; a health
    probe has nothing to hide and needs the headroom).
    """

    __slots__ = ("_last", "_lock", "_wall_ns")

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._last = 0
        self._lock = threading.Lock()

    def next_ns(self) -> int:
        with self._lock:
            now = self._wall_ns()
            self._last = now if now > self._last else self._last + 1
            return self._last

    def next(self) -> bytes:
        return tai64n(self.next_ns())


# --- validation --------------------------------------------------------------------------------


class Outcome(Enum):
    VALID = "valid"
    COOKIE = "cookie"  # a cookie reply: the responder is under load and wants mac2
    FOREIGN = "foreign"  # not addressed to this handshake (receiver index differs): ignore it
    BAD_RESPONSE = "bad-response"
    PSK_MISMATCH = "psk-mismatch"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    detail: str = ""
    cookie: bytes = b""


VALID = Verdict(Outcome.VALID)
FOREIGN = Verdict(Outcome.FOREIGN, "receiver index is not this handshake's sender index")


class Initiator:
    """Everything fixed for one probe key talking to one responder, computed once."""

    __slots__ = (
        "_cookie_key",
        "_hash_r",
        "_mac1_key_i",
        "_mac1_key_r",
        "_private",
        "_psk",
        "_public",
        "_server",
        "_ss",
    )

    def __init__(self, probe_private_key: bytes, server_public_key: bytes, psk: bytes | None = None) -> None:
        if len(probe_private_key) != KEY_LEN or len(server_public_key) != KEY_LEN:
            raise ValueError("WireGuard keys are 32 bytes")
        if psk is not None and len(psk) != KEY_LEN:
            raise ValueError("a WireGuard preshared key is 32 bytes")
        self._private = X25519PrivateKey.from_private_bytes(probe_private_key)
        self._public = self._private.public_key().public_bytes_raw()
        try:
            # the static-static DH never changes: the kernel precomputes it the same way
            self._ss = self._private.exchange(X25519PublicKey.from_public_bytes(server_public_key))
        except ValueError:
            raise ValueError("server public key is a low-order Curve25519 point") from None
        self._psk = psk if psk is not None else ZERO_KEY
        self._hash_r = hash_(hash_(hash_(CONSTRUCTION), IDENTIFIER), server_public_key)
        self._mac1_key_r = hash_(LABEL_MAC1, server_public_key)
        self._mac1_key_i = hash_(LABEL_MAC1, self._public)
        self._cookie_key = hash_(LABEL_COOKIE, server_public_key)
        self._server = X25519PublicKey.from_public_bytes(server_public_key)

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def has_psk(self) -> bool:
        return self._psk != ZERO_KEY

    def initiation(self, sender_index: int, timestamp: bytes, cookie: bytes | None = None) -> tuple[bytes, Handshake]:
        ephemeral = X25519PrivateKey.generate()
        e_pub = ephemeral.public_key().public_bytes_raw()
        chain = kdf1(_CHAIN0, e_pub)
        h = hash_(self._hash_r, e_pub)
        chain, key = kdf2(chain, ephemeral.exchange(self._server))
        static = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, self._public, h)
        h = hash_(h, static)
        chain, key = kdf2(chain, self._ss)
        stamp = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, timestamp, h)
        h = hash_(h, stamp)
        body = _INITIATION_BODY.pack(TYPE_INITIATION, _RESERVED, sender_index, e_pub, static, stamp)
        mac1 = mac(self._mac1_key_r, body)
        # mac2 is zero unless the responder gave us a cookie (section 5.4.4)
        mac2 = mac(cookie, body + mac1) if cookie else _ZERO_MAC
        return body + mac1 + mac2, Handshake(
            self, sender_index=sender_index, ephemeral=ephemeral, chain=chain, h=h, mac1=mac1
        )


_CHAIN0 = hash_(CONSTRUCTION)


class Handshake:
    """One initiation in flight: validates what comes back for it."""

    __slots__ = ("_chain", "_ephemeral", "_final_chain", "_hash", "_initiator", "mac1", "responder_index",
                 "sender_index")

    def __init__(
        self,
        initiator: Initiator,
        *,
        sender_index: int,
        ephemeral: X25519PrivateKey,
        chain: bytes,
        h: bytes,
        mac1: bytes,
    ) -> None:
        self._initiator = initiator
        self.sender_index = sender_index
        self._ephemeral = ephemeral
        self._chain = chain
        self._hash = h
        self.mac1 = mac1
        self.responder_index: int | None = None  # set by a valid response: where data goes
        self._final_chain = b""

    def transport_keys(self) -> tuple[bytes, bytes]:
        """(sending key, receiving key) of the session a valid response established.

        Whitepaper 5.4.5: (T_send, T_recv) = KDF2(C, empty) for the initiator. Computed on
        demand: a check that stops at the handshake never pays for it.
        """
        if not self._final_chain:
            raise ValueError("no valid response yet: no transport keys")
        return kdf2(self._final_chain, b"")

    def validate(self, data: bytes) -> Verdict:
        if len(data) == RESPONSE.size and data[0] == TYPE_RESPONSE:
            return self._validate_response(data)
        if len(data) == COOKIE_REPLY.size and data[0] == TYPE_COOKIE_REPLY:
            return self._open_cookie_reply(data)
        return Verdict(
            Outcome.BAD_RESPONSE,
            f"unexpected datagram: {len(data)} bytes, type {data[0] if data else None}",
        )

    def _validate_response(self, data: bytes) -> Verdict:
        _, reserved, responder, receiver, e_pub, empty, mac1, mac2 = RESPONSE.unpack(data)
        if receiver != self.sender_index:
            return FOREIGN
        if reserved != _RESERVED:
            return Verdict(Outcome.BAD_RESPONSE, "reserved bytes are not zero")
        ini = self._initiator
        # mac1 is keyed by our (the initiator's) public key: proves the datagram is intact
        if not hmac.compare_digest(mac1, mac(ini._mac1_key_i, data[:RESPONSE_MAC1_OFFSET])):
            return Verdict(Outcome.BAD_RESPONSE, "mac1 does not match the probe public key")
        # a responder sets mac2 only with a cookie from us, and a probe never sends cookies
        if mac2 != _ZERO_MAC:
            return Verdict(Outcome.BAD_RESPONSE, "mac2 is set although we never sent a cookie")
        try:
            responder_e = X25519PublicKey.from_public_bytes(e_pub)
            chain = kdf1(self._chain, e_pub)
            chain = kdf1(chain, self._ephemeral.exchange(responder_e))
            chain = kdf1(chain, ini._private.exchange(responder_e))
        except ValueError:
            return Verdict(Outcome.BAD_RESPONSE, "responder ephemeral is a low-order point")
        h = hash_(self._hash, e_pub)
        if final := _open_empty(chain, h, ini._psk, empty):
            self._final_chain, self.responder_index = final, responder
            return VALID
        # Intact (mac1) and addressed to us, yet the AEAD fails: the responder consumed our
        # initiation (it had to, to answer) and keyed the reply with a different preshared key.
        if ini.has_psk and _open_empty(chain, h, ZERO_KEY, empty):
            why = "the server has no preshared key for this probe peer, but one was given"
        elif ini.has_psk:
            why = "the server's preshared key for this probe peer differs"
        else:
            why = "the server has a preshared key for this probe peer; none was given"
        return Verdict(Outcome.PSK_MISMATCH, why)

    def _open_cookie_reply(self, data: bytes) -> Verdict:
        _, reserved, receiver, nonce, sealed = COOKIE_REPLY.unpack(data)
        if receiver != self.sender_index:
            return FOREIGN
        if reserved != _RESERVED:
            return Verdict(Outcome.BAD_RESPONSE, "cookie reply: reserved bytes are not zero")
        try:
            # the cookie is sealed with the mac1 of the message it answers as associated data
            cookie = xaead_decrypt(self._initiator._cookie_key, nonce, sealed, self.mac1)
        except InvalidTag:
            return Verdict(Outcome.BAD_RESPONSE, "cookie reply does not decrypt")
        return Verdict(Outcome.COOKIE, "responder under load sent a cookie reply", cookie)


def _open_empty(chain: bytes, h: bytes, psk: bytes, sealed: bytes) -> bytes:
    """The final chaining key when the empty payload opens, else b""."""
    chain, tau, key = kdf3(chain, psk)
    try:
        ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, sealed, hash_(h, tau))
    except InvalidTag:
        return b""
    return chain
