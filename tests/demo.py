"""`make demo`: the main job, end to end, inside throw-away network namespaces.

interceptd installs the seed istio-iptables command line's rules in a "pod" namespace; a toy proxy listens
on 15001/15006, a toy app serves and calls out, and the demo prints where each connection went and the
counters, then deletes everything it made.
"""

from __future__ import annotations

import os
import sys

from support.netlab import VENV_BIN, Lab, sh

SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]

CASES = [
    ("inbound  peer -> pod 192.0.2.2:8080", "peer", "192.0.2.2", 8080, None),
    ("inbound  peer -> pod 192.0.2.2:15090 (excluded, -d)", "peer", "192.0.2.2", 15090, None),
    ("outbound app (uid 1000) -> 192.0.2.1:9999", "pod", "192.0.2.1", 9999, 1000),
    ("outbound proxy (uid 1337) -> 192.0.2.1:9999", "pod", "192.0.2.1", 9999, 1337),
    ("outbound app (uid 1000) -> its own pod 192.0.2.2:8080 over lo", "pod", "192.0.2.2", 8080, 1000),
    ("outbound proxy (uid 1337) -> its own pod 192.0.2.2:8080 over lo", "pod", "192.0.2.2", 8080, 1337),
]


def describe(answer: str) -> str:
    parts = answer.split()
    if len(parts) < 3:
        return answer
    label, port, odst = parts[:3]
    if label == "proxy":
        side = "outbound" if port == "15001" else "inbound"
        return f"captured by the proxy's {side} listener :{port}, original destination {odst}"
    return f"went direct to the {label}'s real port :{port}"


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    with Lab() as lab:
        print(f"pod namespace {lab.pod} (192.0.2.2) <-> peer namespace {lab.peer} (192.0.2.1)\n")
        lab.serve(lab.pod, "proxy", tcp=[15001, 15006])
        lab.serve(lab.pod, "app", tcp=[8080, 15090])
        lab.serve(lab.peer, "peer", tcp=[9999])
        print("$ istio-iptables " + " ".join(repr(a) if a in ("", "*") else a for a in SEED))
        result = sh(str(VENV_BIN / "istio-iptables"), *SEED, ns=lab.pod, check=False)
        print(result.stderr.strip())
        if result.returncode != 0:
            return 1
        print()
        for title, side, host, port, uid in CASES:
            ns = lab.pod if side == "pod" else lab.peer
            answer = lab.request(ns, host, port, uid=uid, gid=uid)
            print(f"{title:<66} {describe(answer)}")
        print("\n$ interceptd status")
        print(lab.interceptd("status").stdout)
        lab.interceptd("cleanup")
        print(f"cleaned up: table removed; namespaces {lab.pod} and {lab.peer} are deleted on exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
