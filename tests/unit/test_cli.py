"""`pop check-config` as operators run it: ok / every problem, exit 0 / 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pop import wgkeys

SERVER_KEY = wgkeys.encode_key(X25519PrivateKey.generate().public_key().public_bytes_raw())


def check_config(path: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "pop", "check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout + result.stderr


def write(tmp_path: Path, key_file: Path, extra: str = "") -> Path:
    path = tmp_path / "pop.yaml"
    path.write_text(f"""
pop: {{name: ams1, asn: 65101, router_id: 192.0.2.1}}
neighbors: [{{address: 10.0.0.1, peer_as: 65000}}]
prefixes: [198.51.100.1/32]
servers: [{{name: vpn1, address: 10.0.2.10, wireguard: {{public_key: "{SERVER_KEY}"}}}}]
checks: {{wireguard: {{enabled: true, probe_key_file: {key_file}}}}}
{extra}""")
    return path


def test_ok_with_a_private_key_file(tmp_path: Path) -> None:
    key = tmp_path / "probe.key"
    key.write_text(wgkeys.encode_key(X25519PrivateKey.generate().private_bytes_raw()) + "\n")
    key.chmod(0o600)
    assert check_config(write(tmp_path, key)) == (0, "ok\n")


def test_world_readable_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    key = tmp_path / "probe.key"
    key.write_text(wgkeys.encode_key(X25519PrivateKey.generate().private_bytes_raw()) + "\n")
    key.chmod(0o644)
    path = write(tmp_path, key)
    code, output = check_config(path)
    assert code == 2
    assert output.startswith(f"{path}: checks.wireguard.probe_key_file: {key}: key file mode 0644")
    assert f"chmod 600 {key}" in output and "Traceback" not in output


def test_missing_key_and_config_problems(tmp_path: Path) -> None:
    code, output = check_config(write(tmp_path, tmp_path / "absent.key"))
    assert code == 2 and "checks.wireguard.probe_key_file:" in output and "No such file" in output
    code, output = check_config(write(tmp_path, tmp_path / "absent.key", extra="pool: {hold_down: -1}\n"))
    # the loader's problems come first; key files are read only for a config that loads
    assert code == 2 and output.splitlines() == [f"{tmp_path / 'pop.yaml'}: pool.hold_down: -1 is out of range (at least 0.0 and at most 3600)"]


def test_unreadable_config_file(tmp_path: Path) -> None:
    code, output = check_config(tmp_path / "nope.yaml")
    assert code == 2 and output == f"{tmp_path / 'nope.yaml'}: (file): cannot read: No such file or directory\n"


def test_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "pop.yaml"
    path.write_bytes(b"\x00\xff\xfe garbage \x80")
    code, output = check_config(path)
    assert code == 2 and "not valid YAML" in output and "Traceback" not in output
