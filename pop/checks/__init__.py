"""Health checks: async probes that each return a CheckResult value (see base.py).

base.py is the contract, l4.py tier 1, wireguard.py (with noise.py) tier 2, cascade.py
builds every server's checks from the configuration.
"""
