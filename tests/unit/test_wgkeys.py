"""Key parsing and key files: formats `wg` writes, and refusal of readable key files."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pop import wgkeys


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_parse_public_key_round_trips() -> None:
    raw = os.urandom(32)
    raw = wgkeys.public_key_of(raw)
    assert wgkeys.parse_public_key(wgkeys.encode_key(raw) + "\n") == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(os.urandom(32)).decode()[:-1],  # truncated padding
        base64.b64encode(os.urandom(32)).decode().replace("=", "A"),  # 33 bytes then
    ],
)
def test_parse_public_key_rejects_non_keys(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a base64 Curve25519 key \(32 bytes\)"):
        wgkeys.parse_public_key(text)


def test_parse_public_key_rejects_low_order_points() -> None:
    with pytest.raises(ValueError, match="low-order"):
        wgkeys.parse_public_key(base64.b64encode(bytes(32)).decode())


def test_read_private_key_accepts_0600_and_0400(tmp_path: Path) -> None:
    raw = os.urandom(32)
    for mode in (0o600, 0o400):
        path = write(tmp_path / f"k{mode:o}", wgkeys.encode_key(raw) + "\n", mode)
        assert wgkeys.read_private_key(path) == raw


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o666])
def test_readable_key_file_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "probe.key", wgkeys.encode_key(os.urandom(32)), mode)
    with pytest.raises(ValueError) as info:
        wgkeys.read_private_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_psk_file_is_checked_the_same_way(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert wgkeys.read_psk(write(tmp_path / "psk", wgkeys.encode_key(raw), 0o600)) == raw
    with pytest.raises(ValueError, match="chmod 600"):
        wgkeys.read_psk(write(tmp_path / "psk2", wgkeys.encode_key(raw), 0o644))


def test_bad_key_file_contents_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.key", "hello\n", 0o600)
    with pytest.raises(ValueError, match=rf"{path}: private key file: not a base64"):
        wgkeys.read_private_key(path)
    with pytest.raises(ValueError, match="cannot open"):
        wgkeys.read_private_key(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="not a regular file"):
        wgkeys.read_private_key(tmp_path)


def test_mode_check_is_pure() -> None:
    wgkeys.check_key_file_mode("k", stat.S_IFREG | 0o600)
    with pytest.raises(ValueError, match="0644"):
        wgkeys.check_key_file_mode("k", stat.S_IFREG | 0o644)


@pytest.mark.skipif(shutil.which("wg") is None, reason="needs wg (wireguard-tools)")
def test_keys_written_by_wg_tools(tmp_path: Path) -> None:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout
    raw = wgkeys.read_private_key(write(tmp_path / "probe.key", private, 0o600))
    assert wgkeys.public_key_of(raw) == wgkeys.parse_public_key(public)
    assert len(wgkeys.read_psk(write(tmp_path / "psk", psk, 0o600))) == 32
