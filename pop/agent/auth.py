"""Authenticating the agent's reports: HMAC-SHA256 over the exact body bytes.

The agent sends `X-Pop-Signature: hmac-sha256=<hex>` and `X-Pop-Agent: <name>` with every
report; the PoP recomputes the HMAC over the bytes it received with the same shared key.
`sign` and `verify` are pure; `verify` compares in constant time and is False (never an
exception) for any header it cannot parse. The signature proves who wrote the body, not when:
freshness and replay are the report's own fields (`generated_at`, `boot_id`, `sequence`),
which the signature covers. docs/probe-agent.md says why HMAC rather than TLS client
certificates.

`read_key` reads the shared key file with the same reader as the WireGuard key files
(pop.wgkeys.read_secret_file): mode 0600 or stricter, else a ValueError naming the mode and the fix.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from pop.wgkeys import read_secret_file

SIGNATURE_HEADER = "X-Pop-Signature"
AGENT_HEADER = "X-Pop-Agent"
_SCHEME = "hmac-sha256="
MIN_KEY_BYTES = 16
_MAX_KEY_FILE = 4096


def sign(key: bytes, body: bytes) -> str:
    """The value of the X-Pop-Signature header for `body`."""
    return _SCHEME + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(key: bytes, body: bytes, header: str | None) -> bool:
    """Whether `header` is a valid signature of `body` under `key`."""
    if header is None:
        return False
    # compare the whole header text: a malformed one differs from the expected one, and
    # compare_digest on ASCII str runs in time independent of where they differ
    expected = sign(key, body)
    try:
        return hmac.compare_digest(expected, header.strip())
    except TypeError:  # non-ASCII header text
        return False


def read_key(path: str | os.PathLike[str]) -> bytes:
    """The shared key: the file's content without surrounding whitespace, at least 16 bytes.

    `head -c 32 /dev/urandom | base64 > agent.key; chmod 600 agent.key` writes a good one; the
    text itself is the key (both sides read the same file, so no encoding needs agreeing on).
    """
    name = os.fspath(path)
    data = read_secret_file(name, "shared key", _MAX_KEY_FILE + 1)
    key = data.strip()
    if len(data) > _MAX_KEY_FILE:
        raise ValueError(f"{name}: shared key file is larger than {_MAX_KEY_FILE} bytes")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{name}: shared key is {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
                         f"(fix: head -c 32 /dev/urandom | base64 > {name})")
    return key
