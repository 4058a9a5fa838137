"""`make soak`: the full counts, about 10 minutes, not in CI. Prints the figures as JSON.

1. Gap: probers outbound and inbound through 1,000 SIGHUP reloads, 20 restarts (SIGTERM, and SIGKILL in
   the middle of a reload's apply) and 1,000 injected drifts (flush or delete of the table).
2. Resources: 100,000 operations, half applies (reloads) and half /metrics scrapes; the agent's RSS,
   descriptors and threads sampled every 10,000, with their least-squares slope per 10,000 operations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from support.gaplab import churn, run_gap
from support.netlab import Lab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=1000)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--drifts", type=int, default=1000)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespaces)")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        out["gap"] = run_gap(lab, Path(tmp), args.reloads, args.restarts, args.drifts).figures()
        print(json.dumps(out["gap"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        out["resources"] = churn(lab, Path(tmp), args.ops, args.every)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
