"""`pop probe-agent`: tier 3's external vantage point, and what it serves.

The flow, one module each: `config` (agent.yaml -> frozen dataclasses, pure), `view` (check
results -> each PoP's reachable opinion after rise/fall, and the report, pure), `auth` (HMAC
over the report's bytes, pure but for the key file reader), `daemon` (the probe schedule and
the HTTP endpoints). The PoP's side of the contract is pop/external.py and docs/decisions.md.
"""
