"""--own-table: the agent's table carries nftables' owner flag, so no other process can flush or edit it.

libnftables 1.0.6 cannot set `persist` (its parser does not know the word), so here the table goes away with
the agent: the trade-off the option's help and the agent's warning state. Tests run the real agent in the
lab's pod namespace and poke at its table with `nft` and `interceptd` from outside the agent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.gaplab import CONFIG_A, AgentProc, Prober
from support.netlab import INTERCEPTD, Lab, sh, wait_until

from interceptd.ruleset import names as N

ARGS = ["-i", "198.51.100.0/24", "-b", "*", "-d", "15090", "--metrics-address", ""]


def flags(lab: Lab) -> str | None:
    """The `flags` line of the table's text listing, '' without flags, None when the table is missing."""
    listing = sh("nft", "list", "table", "inet", "interceptd", ns=lab.pod, check=False)
    if listing.returncode != 0:
        return None
    lines = [line.strip() for line in listing.stdout.splitlines() if line.strip().startswith("flags ")]
    return lines[0] if lines else ""


@pytest.fixture
def agent(lab: Lab, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, INTERCEPTD, "run", "--own-table", "--state-dir",
                             str(tmp_path / "run"), "--log-format", "json", *ARGS],
                            stdout=log, stderr=log, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    try:
        assert wait_until(lambda: flags(lab) == "flags owner" and N.ISTIO_OUTPUT in _chains(lab), timeout=10), \
            (tmp_path / "agent.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def _chains(lab: Lab) -> str:
    return sh("nft", "list", "chains", "inet", ns=lab.pod, check=False).stdout


def test_foreign_changes_are_refused_while_owned(lab: Lab, agent: subprocess.Popen[bytes], tmp_path: Path) -> None:
    before = sh("nft", "-j", "list", "chain", "inet", "interceptd", N.ISTIO_OUTPUT, ns=lab.pod).stdout
    for cmd in (["flush", "table", "inet", "interceptd"], ["delete", "table", "inet", "interceptd"],
                ["flush", "chain", "inet", "interceptd", N.ISTIO_OUTPUT],
                ["add", "rule", "inet", "interceptd", N.ISTIO_OUTPUT, "accept"],
                ["flush", "set", "inet", "interceptd", N.SET_PROXY_UIDS]):
        refused = sh("nft", *cmd, ns=lab.pod, check=False)
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr, (cmd, refused)
    cleanup = lab.interceptd("cleanup", check=False)
    assert cleanup.returncode == 1 and "owned by another process" in cleanup.stderr, cleanup.stderr
    assert lab.interceptd("apply", "--own-table", *ARGS, check=False).returncode == 2
    assert sh("nft", "-j", "list", "chain", "inet", "interceptd", N.ISTIO_OUTPUT, ns=lab.pod).stdout == before
    # Others can still read it: status lists it although libnftables 1.0.6 garbles owned tables' JSON.
    status = lab.interceptd("status", "--json")
    assert N.ISTIO_OUTPUT in status.stdout
    assert '"own-table"' in (tmp_path / "agent.log").read_text()


def test_owner_reloads_and_the_table_goes_with_the_agent(lab: Lab, agent: subprocess.Popen[bytes],
                                                         tmp_path: Path) -> None:
    sh("nft", "list", "table", "inet", "interceptd", ns=lab.pod)
    agent.send_signal(signal.SIGHUP)  # same config: a no-op reload, then a repair-free check
    assert wait_until(lambda: b'"reload"' in (tmp_path / "agent.log").read_bytes(), timeout=5)
    assert flags(lab) == "flags owner"
    log = (tmp_path / "agent.log").read_text()
    assert "persist" in log  # the warning explains the trade-off
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=10)
    assert wait_until(lambda: flags(lab) is None, timeout=5)  # no persist here: the owner took it along


PROXY_UID = 1337
PROXY_RETURN = "istio-output/proxy-uid-return"  # the named counter of the rule that lets the proxy out


def _packets(lab: Lab, counter: str) -> int:
    listing = sh("nft", "list", "counter", "inet", "interceptd", counter, ns=lab.pod).stdout
    words = listing.split()
    return int(words[words.index("packets") + 1])


def test_an_existing_table_is_taken_over_without_a_gap(lab: Lab, tmp_path: Path) -> None:
    """An `apply`-installed table becomes owned by one text transaction that copies it, counters included:
    probers connecting without pause in both directions see no connection bypass the proxy meanwhile."""
    lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
    lab.serve(lab.peer, "peer", tcp=[9999])
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG_A)
    lab.interceptd("apply", "--config", str(config))
    for _ in range(5):  # the proxy's own connections: counted once each (nat sees the first packet), and
        lab.request(lab.pod, "198.51.100.1", 9999, uid=PROXY_UID, gid=PROXY_UID)  # no prober makes one
    assert _packets(lab, PROXY_RETURN) == 5
    probers = [Prober(lab, "outbound"), Prober(lab, "inbound")]
    agent = AgentProc(lab, tmp_path, "--own-table")
    try:
        time.sleep(0.3)
        agent.start()
        assert wait_until(lambda: flags(lab) == "flags owner", timeout=10), agent.log.read_text()
        time.sleep(0.3)
    finally:
        samples = [p.stop() for p in probers]
    try:
        for s in samples:
            windows = s.windows()
            assert s.count("ok") > 10 and s.count("bypass") == 0 and s.count("fail") == 0, \
                (s.direction, s.count("ok"), s.count("bypass"), s.count("fail"), windows)
            assert max(windows, default=0.0) == 0.0
        # The owned copy kept the count from before the takeover: it did not start again from zero.
        assert _packets(lab, PROXY_RETURN) == 5
        refused = sh("nft", "flush", "table", "inet", "interceptd", ns=lab.pod, check=False)
        assert refused.returncode != 0
    finally:
        agent.close()
