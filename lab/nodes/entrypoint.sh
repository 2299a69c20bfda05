#!/bin/sh
# The lab image's command under containerlab; POP_LAB_ROLE (set in containerlab.yml) picks
# what the node runs. The namespace runner (lab/runner.py) does the same without containers.
set -eu
VIP=198.51.100.1
case "${POP_LAB_ROLE:-}" in
pop)
    # pop refuses a probe key that others can read; a bind mount keeps the repository's mode
    install -D -m 0600 /etc/pop-lab/probe.key /etc/pop/probe.key
    install -D -m 0600 /etc/pop-lab/agents.key /etc/pop/agents.key
    # answers only where the node holds the VIP on lo (mode none); a PoP in mode ecmp routes
    # the VIP to its servers, which answer instead
    python3 /opt/pop/lab/nodes/whoami.py "$VIP" 8080 "$(hostname)" &
    exec pop run -c /etc/pop/pop.yaml
    ;;
vpn)
    wireguard-go wg0
    wg set wg0 listen-port 51820 private-key /etc/pop-lab/wg.key \
        peer "$(cat /etc/pop-lab/probe.pub)" allowed-ips 10.255.255.1/32
    # the probe agents handshake with every server, each with its own key (a /32 nobody uses)
    n=1
    for pub in /etc/pop-lab/peers/*.pub; do
        wg set wg0 peer "$(cat "$pub")" allowed-ips "10.255.$n.1/32"
        n=$((n + 1))
    done
    # the tunnel check: the probe (10.255.255.1) pings inet1 through wg0, forwarded and masqueraded
    ip addr add 10.255.0.1/16 dev wg0
    ip link set wg0 up
    sysctl -qw net.ipv4.ip_forward=1
    nft -f - <<'NFT'
table ip poplab_nat {
  chain post { type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.255.0.0/16 ip daddr != 10.255.0.0/16 masquerade
  }
}
NFT
    # the load signal (pop1's load:) reads the server's CPU here; in a container it is the
    # host's CPU unless lxcfs is installed (the namespace runner gives each server its own)
    prometheus-node-exporter --web.listen-address=:9100 --collector.disable-defaults --collector.cpu \
        >/dev/null 2>&1 &
    # the servers of a PoP in mode ecmp hold the VIP on lo and answer on it, and say who
    # they are there for the agents' catchment map
    python3 /opt/pop/lab/nodes/whoami.py "$VIP" 8080 "$(hostname)" &
    if [ -n "${POP_LAB_POP:-}" ]; then
        pop identity --pop "$POP_LAB_POP" --server "$(hostname)" --listen "$VIP:9191" &
    fi
    exec python3 /opt/pop/lab/nodes/whoami.py 0.0.0.0 443 "$(hostname)"
    ;;
probe)
    # a probe agent: pop refuses keys that others can read; a bind mount keeps the repository's mode
    install -D -m 0600 /etc/pop-lab/agents.key /etc/pop/agents.key
    install -D -m 0600 /etc/pop-lab/probe.key /etc/pop/probe.key
    exec pop probe-agent -c /etc/pop/agent.yaml
    ;;
noc)
    # the fleet page over every PoP's status (containerlab publishes nothing: reach it from the
    # host with `docker exec` or a port mapping you add)
    exec pop noc -c /etc/pop/noc.yaml
    ;;
client|internet)
    exec sleep infinity
    ;;
*)
    echo "pop-lab: set POP_LAB_ROLE to pop, vpn, client, probe, noc or internet" >&2
    exit 2
    ;;
esac
