"""A TCP "who am I" service: every connection gets TEXT and is closed.

    python3 whoami.py ADDRESS PORT TEXT

A PoP runs it on the anycast address, so a client learns which PoP its packets reached; the
lab's VPN-server containers run it on their service port. It binds with IP_FREEBIND, so it
can start before the address exists (containerlab runs a node's `exec` after its command).
Standalone on purpose: the lab image and the namespace runner both run this file.
"""

import socket
import sys

IP_FREEBIND = 15  # linux/in.h; not exported by the socket module


def main() -> None:
    address, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    server.bind((address, port))
    server.listen(128)
    while True:
        conn, _ = server.accept()
        try:
            conn.sendall(text + b"\n")
        except OSError:
            pass  # the client left first; nothing to tell it
        finally:
            conn.close()


if __name__ == "__main__":
    main()
