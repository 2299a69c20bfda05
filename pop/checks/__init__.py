"""Health checks: async probes that each return a CheckResult value (see base.py)."""
