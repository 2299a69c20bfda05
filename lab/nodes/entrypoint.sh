#!/bin/sh
# The lab image's command under containerlab; POP_LAB_ROLE (set in containerlab.yml) picks
# what the node runs. The namespace runner (lab/runner.py) does the same without containers.
set -eu
VIP=198.51.100.1
case "${POP_LAB_ROLE:-}" in
pop)
    # pop refuses a probe key that others can read; a bind mount keeps the repository's mode
    install -D -m 0600 /etc/pop-lab/probe.key /etc/pop/probe.key
    # answers only where the node holds the VIP on lo (mode none); a PoP in mode ecmp routes
    # the VIP to its servers, which answer instead
    python3 /opt/pop/lab/nodes/whoami.py "$VIP" 8080 "$(hostname)" &
    exec pop run -c /etc/pop/pop.yaml
    ;;
vpn)
    wireguard-go wg0
    wg set wg0 listen-port 51820 private-key /etc/pop-lab/wg.key \
        peer "$(cat /etc/pop-lab/probe.pub)" allowed-ips 10.255.255.1/32
    ip link set wg0 up
    # the servers of a PoP in mode ecmp hold the VIP on lo and answer on it
    python3 /opt/pop/lab/nodes/whoami.py "$VIP" 8080 "$(hostname)" &
    exec python3 /opt/pop/lab/nodes/whoami.py 0.0.0.0 443 "$(hostname)"
    ;;
client | probe)
    exec sleep infinity
    ;;
*)
    echo "pop-lab: set POP_LAB_ROLE to pop, vpn, client or probe" >&2
    exit 2
    ;;
esac
