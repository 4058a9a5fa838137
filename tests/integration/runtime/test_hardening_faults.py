"""Kernel faults: the agent keeps the last good ruleset, backs off, reports not-ready and recovers.

- Table locked by another process: a foreign tool replaces interceptd's table by one it owns (nftables'
  owner flag), so every repair is refused (EPERM) until that process exits.
- Netlink event socket overrun (ENOBUFS): one foreign transaction floods the event socket with set-element
  events and, at its end, flushes interceptd's table; with the periodic check an hour away, only the
  overrun itself can tell the agent to look. The agent is stopped (SIGSTOP) during the flood so the overrun
  does not depend on how fast it drains the socket.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.gaplab import CONFIG_A, CONFIG_B, AgentProc
from support.netlab import Lab, call_in, sh, wait_until

METRICS = 'metrics_address = "127.0.0.1:15321"\n'

# A foreign process that takes the table and holds it, owned, until its stdin closes.
HOLDER = """
import sys, nftables
n = nftables.Nftables()
# One transaction: between two, the agent would already have repaired the deleted table.
rc, _, err = n.cmd("delete table inet interceptd; add table inet interceptd { flags owner; }")
assert rc == 0, err
print("held", flush=True)
sys.stdin.read()
"""


def ready(path: str = "/readyz") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:15321{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def events(agent: AgentProc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]


def captured(lab: Lab) -> bool:
    return lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000).startswith("pod 15001 ")


def start(lab: Lab, tmp: Path) -> AgentProc:
    lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
    lab.serve(lab.peer, "peer", tcp=[9999])
    agent = AgentProc(lab, tmp, "--reconcile-interval", "3600")
    agent.write_config(CONFIG_A.replace('metrics_address = ""\n', METRICS))
    agent.start()
    assert captured(lab) and call_in(lab.pod, ready) == 200
    return agent


def test_table_locked_by_another_process(lab: Lab, tmp_path: Path) -> None:
    agent = start(lab, tmp_path)
    try:
        holder = subprocess.Popen(["ip", "netns", "exec", lab.pod, "/usr/bin/python3", "-c", HOLDER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # The event shows the drift at once; the repair is refused; retries back off; /readyz says so.
        assert wait_until(lambda: sum(e["event"] == "retry" for e in events(agent)) >= 2, timeout=10)
        assert call_in(lab.pod, ready) == 503
        agent.write_config(CONFIG_B.replace('metrics_address = ""\n', METRICS))
        agent.send(signal.SIGHUP)  # a reload during the fault is refused too: the last good config stays
        assert wait_until(lambda: any(e["event"] == "reload" for e in events(agent)), timeout=10)
        refused = [e for e in events(agent) if e["event"] in ("repair", "retry", "reload") and e["error"]]
        assert all("Operation not permitted" in e["error"] for e in refused), refused
        delays = [e["retry_in_s"] for e in refused if "retry_in_s" in e]
        assert delays == sorted(delays) and delays[-1] > delays[0], delays  # exponential backoff
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=10)  # its owned table goes with it; the next retry succeeds
        assert wait_until(lambda: call_in(lab.pod, ready) == 200, timeout=15), agent.log.read_text()
        assert captured(lab)
        recovered = [e for e in events(agent) if e["event"] == "retry" and not e["error"]]
        assert recovered, agent.log.read_text()
    finally:
        agent.close()


def _netlink_drops() -> int:
    """Dropped messages summed over the namespace's netfilter netlink sockets (/proc/net/netlink)."""
    with open("/proc/net/netlink") as fh:
        rows = [line.split() for line in fh.readlines()[1:]]
    return sum(int(r[8]) for r in rows if r[1] == "12")


def test_event_socket_overrun_still_leads_to_the_repair(lab: Lab, tmp_path: Path) -> None:
    agent = start(lab, tmp_path)
    try:
        # Each element event carries a 120-byte comment: some 15 MB of events, twice the socket's buffer.
        note = "x" * 120
        elements = ", ".join(f'10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} comment "{note}"' for i in range(60000))
        flood = tmp_path / "flood.nft"
        flood.write_text("add table inet flood\nadd set inet flood s { type ipv4_addr; }\n"
                         f"add element inet flood s {{ {elements} }}\nflush table inet interceptd\n")
        drops = call_in(lab.pod, _netlink_drops)
        # Stopped, the agent cannot drain the socket while the flood arrives (as when it is descheduled).
        agent.send(signal.SIGSTOP)  # `ip netns exec` execs: the process is the agent itself
        try:
            sh("nft", "-f", str(flood), ns=lab.pod)
        finally:
            agent.send(signal.SIGCONT)
        assert wait_until(lambda: any(e["event"] == "repair" for e in events(agent)), timeout=20), \
            agent.log.read_text()
        assert call_in(lab.pod, _netlink_drops) > drops  # the overrun did happen
        assert [e["seen_by"] for e in events(agent) if e["event"] == "repair"] == ["event"]
        assert captured(lab) and call_in(lab.pod, ready) == 200
    finally:
        agent.close()
