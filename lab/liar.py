"""A probe agent that lies, for the lab's tier-3 faults: `python -m lab.liar MODE AGENT_YAML CAPTURED`.

It serves `GET /v1/results` on the agent's own address and port, in place of the real agent:

- `replay`: the report in CAPTURED (a JSON file: `body`, `signature`), which the real agent
  signed earlier, served again and again: stale, and a sequence the PoPs have already seen.
- `stale`: a report signed with the agent's real key, with a fresh sequence, dated a minute
  ago (an agent whose clock is wrong, or a report held back), saying every PoP is unreachable.
- `forged`: a fresh report saying every PoP is unreachable, signed with a key nobody shares.

Each PoP must drop all three (docs/decisions.md), count them, and change nothing. Reuses the
agent's own report and signing code, so the lies differ from the truth only where they say.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pop.agent import auth, config, view

STALE_BY = 60.0  # seconds: far beyond any PoP's max_age + max_skew


def main() -> None:
    mode, config_path, captured = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    agent = config.load(config_path.read_text(), str(config_path))
    key = auth.read_key(agent.key_file) if mode != "forged" else secrets.token_bytes(32)
    boot_id = secrets.token_hex(8)
    sequence = 0

    def lie() -> tuple[bytes, str]:
        nonlocal sequence
        if mode == "replay":
            data = json.loads(captured.read_text())
            return data["body"].encode(), str(data["signature"])
        sequence += 1
        now = time.time() - (STALE_BY if mode == "stale" else 0.0)
        views = {pop.name: view.start([], now) for pop in agent.pops}  # never seen rising: unreachable
        body = view.encode(view.report(agent.name, boot_id, sequence, now, views=views, landings={}))
        return body, auth.sign(key, body)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, signature = lie()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header(auth.SIGNATURE_HEADER, signature)
            self.send_header(auth.AGENT_HEADER, agent.name)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    print(f"liar {mode} agent={agent.name} listen={agent.listen}:{agent.port}", flush=True)
    ThreadingHTTPServer((agent.listen, agent.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
