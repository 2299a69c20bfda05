"""Lab primitives for tests and benchmarks against real daemons and kernels.

- ``lab.netns``: network namespaces, veth links, foreground child processes.
- ``lab.frr``: FRR routers (zebra + bgpd) inside a namespace, driven through vtysh.
- ``lab.routewatch``: timestamped rtnetlink route events for one prefix, to time convergence.
- ``lab.microvm``: Debian's own kernel under QEMU, for kernel features this host lacks
  (IPVS, kernel WireGuard, netem); ``lab.microvm_kernel`` builds and caches that kernel.

Everything here needs root. Nothing here touches the host's own network namespace: addresses,
routes and links exist only inside namespaces (or VMs) that the lab created.
"""
