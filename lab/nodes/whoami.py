"""A TCP "who am I" service: a connection gets TEXT at once, and again for every line it sends.

    python3 whoami.py ADDRESS PORT TEXT

A PoP (or, for a PoP that steers traffic to its servers, each server) runs it on the anycast
address, so a client learns which node its packets reached; a client that keeps its
connection open and sends a line now and then learns where that same flow lands *now* (a
flow moved to another node is reset there). The lab's VPN-server containers also run it on
their service port. It binds with IP_FREEBIND, so it can start before the address exists
(containerlab runs a node's `exec` after its command). Standalone on purpose: the lab image
and the namespace runner both run this file.
"""

import socket
import sys
import threading

IP_FREEBIND = 15  # linux/in.h; not exported by the socket module


def serve(conn: socket.socket, text: bytes) -> None:
    with conn:
        try:
            conn.sendall(text)
            while conn.recv(256):
                conn.sendall(text)
        except OSError:
            pass  # the client left first; nothing to tell it


def main() -> None:
    address, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    server.bind((address, port))
    server.listen(128)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, text), daemon=True).start()


if __name__ == "__main__":
    main()
