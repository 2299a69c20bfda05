"""A real WireGuard server (wireguard-go) in a lab namespace, with the probe key as a peer.

`WireGuardServer(ns, ifname, workdir, port)` runs `wireguard-go -f IFNAME` as a foreground
child of the harness (or, with `kernel=True`, creates a kernel WireGuard link: the microVM's
kernel has the module) and configures it with `wg`: a fresh private key, the listen port, and
peers added with `add_peer()` (each with its allowed-ips: by default a /32 nobody uses; the
probe peer of a tunnel check gets the probe's tunnel address), and optionally a tunnel
address of its own on the interface (`tunnel_address`, CIDR: the route back to the peers'
tunnel addresses, and a target for the tunnel check). `stop()` kills the daemon (the UDP port then answers with ICMP
port unreachable) and `start()` brings it back with the same key and peers.

wireguard-go's UAPI socket lives in /var/run/wireguard/<ifname>.sock for *every* namespace,
so interface names must be unique on the host: give each server a name with a run-unique part.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from lab.netns import Netns
from pop import wgkeys

UAPI_DIR = Path("/var/run/wireguard")


def keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def write_key(path: Path, raw: bytes) -> Path:
    """A key file as `wg genkey` writes it, readable by its owner only."""
    path.write_text(wgkeys.encode_key(raw) + "\n")
    path.chmod(0o600)
    return path


class WireGuardServer:
    def __init__(self, ns: Netns, ifname: str, workdir: Path, port: int = 51820, *, kernel: bool = False,
                 tunnel_address: str | None = None) -> None:
        self.ns = ns
        self.tunnel_address = tunnel_address
        self.kernel = kernel
        self._up = False
        self.ifname = ifname
        self.workdir = workdir
        self.port = port
        self.private, self.public = keypair()
        self.peers: list[tuple[bytes, bytes | None, str]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{ifname}.log"
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def uapi(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    @property
    def public_key(self) -> str:
        return wgkeys.encode_key(self.public)

    @property
    def running(self) -> bool:
        return self._up if self.kernel else self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        if self.kernel:
            # the kernel opens the UDP socket when the link goes up
            self.ns.run("ip", "link", "add", self.ifname, "type", "wireguard")
        else:
            self.uapi.unlink(missing_ok=True)
            self.proc = self.ns.popen("wireguard-go", "-f", self.ifname, log=self.log)
            deadline = time.monotonic() + 10
            while not self.uapi.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"wireguard-go {self.ifname} did not start: {self.log.read_text()}")
                time.sleep(0.02)
        self._up = True
        key = write_key(self.workdir / f"{self.ifname}.key", self.private)
        self.ns.run("wg", "set", self.ifname, "listen-port", str(self.port), "private-key", str(key))
        if self.tunnel_address is not None:
            self.ns.run("ip", "addr", "add", self.tunnel_address, "dev", self.ifname)
        self.ns.run("ip", "link", "set", self.ifname, "up")
        for public, psk, allowed in self.peers:
            self._set_peer(public, psk, allowed)

    def add_peer(self, public: bytes, psk: bytes | None = None, allowed_ips: str | None = None) -> None:
        # by default a /32 nobody uses: a peer that only proves the handshake sends no data
        allowed = allowed_ips or f"10.255.{len(self.peers) + 1}.1/32"
        self.peers.append((public, psk, allowed))
        if self.running:
            self._set_peer(public, psk, allowed)

    def set_allowed_ips(self, public: bytes, allowed_ips: str) -> None:
        """Change a peer's allowed-ips (kept across restarts)."""
        self.peers = [(p, psk, allowed_ips if p == public else allowed) for p, psk, allowed in self.peers]
        if self.running:
            self.ns.run("wg", "set", self.ifname, "peer", wgkeys.encode_key(public), "allowed-ips", allowed_ips)

    def _set_peer(self, public: bytes, psk: bytes | None, allowed: str) -> None:
        args = ["wg", "set", self.ifname, "peer", wgkeys.encode_key(public), "allowed-ips", allowed]
        if psk is not None:
            args += ["preshared-key", str(write_key(self.workdir / f"{self.ifname}.psk", psk))]
        self.ns.run(*args)

    def stop(self) -> None:
        if self.kernel:
            if self._up:
                self.ns.run("ip", "link", "del", self.ifname, check=False)
            self._up = False
            return
        self._up = False
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None
        # wireguard-go removes its socket on a clean exit, not after SIGKILL
        self.uapi.unlink(missing_ok=True)
