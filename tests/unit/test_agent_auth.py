"""The report's HMAC: sign, verify (tampered body, wrong key, malformed header), the key file."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from pop.agent import auth

KEY = b"0123456789abcdef0123456789abcdef"
BODY = b'{"version":1,"agent":"probe1","sequence":7}'


def test_signature_is_hmac_sha256_of_the_exact_body_in_hex() -> None:
    assert auth.sign(KEY, BODY) == "hmac-sha256=" + hmac.new(KEY, BODY, hashlib.sha256).hexdigest()


def test_a_signed_body_verifies() -> None:
    assert auth.verify(KEY, BODY, auth.sign(KEY, BODY))


@pytest.mark.parametrize("body", [
    BODY.replace(b"7", b"8"),  # a replayed body with its sequence bumped
    BODY + b" ",  # even whitespace: the signature is over the bytes, not the JSON's meaning
    b"",
])
def test_a_tampered_body_does_not_verify(body: bytes) -> None:
    assert not auth.verify(KEY, body, auth.sign(KEY, BODY))


def test_a_wrong_key_does_not_verify() -> None:
    assert not auth.verify(b"another key, sixteen bytes long", BODY, auth.sign(KEY, BODY))


@pytest.mark.parametrize("header", [
    None, "", "hmac-sha256=", "sha256=" + hmac.new(KEY, BODY, hashlib.sha256).hexdigest(),
    "hmac-sha256=" + hmac.new(KEY, BODY, hashlib.sha256).hexdigest().upper(), "hmac-sha256=é",
])
def test_a_malformed_header_does_not_verify_and_does_not_raise(header: str | None) -> None:
    assert not auth.verify(KEY, BODY, header)


def test_key_file_is_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    assert auth.read_key(path) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_file_others_can_read_is_refused_naming_the_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(KEY)
    path.chmod(mode)
    with pytest.raises(ValueError, match=f"key file mode {mode:04o} lets group/others access it"):
        auth.read_key(path)


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(b"secret\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="shared key is 6 bytes, at least 16"):
        auth.read_key(path)


def test_a_missing_key_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path}/nope: cannot open shared key file"):
        auth.read_key(tmp_path / "nope")
