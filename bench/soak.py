"""Soak the lab: random faults of every kind for a while, invariants checked all along.

Runs lab.soak against the lab of containerlab.yml (namespaces, real FRR, ExaBGP, wireguard-go,
agents) and prints its summary: faults injected by kind, invariant checks made, violations
(the goal: none), the longest a PoP without a live server stayed announced, the memory and
descriptors of an engine that lived through it all, and how long the lab took to converge
once the faults were undone. The seed makes a run repeatable.

    flock /tmp/pop-netns.lock .venv/bin/python bench/soak.py [--minutes 60] [--seed N] [--json out.json]

CI runs it for 5 minutes (tests/netns/test_soak.py); the documented run is an hour.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.runner import Lab
from lab.soak import Soak, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with Lab.from_file() as lab:
        print(f"lab up in {lab.up():.1f}s ({lab.prefix}*); soaking {args.minutes:g} min, seed {seed}", flush=True)
        result = summary(Soak(lab, seed).run(args.minutes * 60))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
