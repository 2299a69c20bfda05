"""WireGuard key handling for config validation, the handshake check and `pop wg-probe`.

Keys are the base64 text `wg genkey`, `wg pubkey` and `wg genpsk` write: 44 characters
encoding 32 bytes. Everything here is pure except the two file readers, which refuse a key
file that anyone but its owner can access (the probe private key lets whoever reads it
impersonate the probe peer on every VPN server). Errors are ValueError with a message that
names the problem (and the file and the fix where there is one); callers prefix the config
key path.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

KEY_LEN = 32
NOT_A_KEY = "not a base64 Curve25519 key (32 bytes)"
_MAX_KEY_FILE = 4096

# any fixed scalar works: it only serves to detect low-order points, whose DH is all zeros
_WITNESS = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def decode_key(text: str) -> bytes:
    """32 bytes from the base64 text of any WireGuard key (private, public or preshared)."""
    text = text.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(NOT_A_KEY) from None
    if len(raw) != KEY_LEN:
        raise ValueError(NOT_A_KEY)
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> bytes:
    """A peer's public key; rejects low-order points, with which no handshake can succeed."""
    raw = decode_key(text)
    try:
        _WITNESS.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ValueError("a low-order Curve25519 point, not a usable public key") from None
    return raw


def public_key_of(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def read_private_key(path: str | os.PathLike[str]) -> bytes:
    """The probe private key from a file written by `wg genkey` (mode 0600 or stricter)."""
    return _read_key_file(path, "private key")


def read_psk(path: str | os.PathLike[str]) -> bytes:
    """A preshared key from a file written by `wg genpsk` (mode 0600 or stricter)."""
    return _read_key_file(path, "preshared key")


def check_key_file_mode(path: str, mode: int) -> None:
    """Raise unless group and others have no access at all (the check, kept pure for tests)."""
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file")
    if mode & 0o077:
        raise ValueError(
            f"{path}: key file mode {stat.S_IMODE(mode):04o} lets group/others access it; "
            f"refusing to use it (fix: chmod 600 {path})"
        )


def read_secret_file(path: str | os.PathLike[str], what: str, limit: int = _MAX_KEY_FILE) -> bytes:
    """Up to `limit` bytes of a file only its owner may access (also the probe agents' HMAC key)."""
    name = os.fspath(path)
    try:
        # check the mode of the file we actually read (fstat), not of whatever the path names
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{name}: cannot open {what} file: {exc.strerror}") from None
    try:
        check_key_file_mode(name, os.fstat(fd).st_mode)
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    name = os.fspath(path)
    data = read_secret_file(name, what)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {what} file: {NOT_A_KEY}") from None
    try:
        return decode_key(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {what} file: {exc}") from None
