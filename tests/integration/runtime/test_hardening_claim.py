"""One agent per table in a network namespace, whatever --state-dir each was given; the claim is made for
another namespace (as the node agent does for a pod) by entering it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.netlab import INTERCEPTD, Lab, wait_until

from interceptd.errors import LockedError
from interceptd.runtime.lockfile import TableClaim

NO_METRICS = "--metrics-address="


def run_in(lab: Lab, state_dir: Path, *args: str) -> list[str]:
    return ["ip", "netns", "exec", lab.pod, INTERCEPTD, "run", "--state-dir", str(state_dir), "--log-format",
            "json", NO_METRICS, *args]


def table_present(lab: Lab) -> bool:
    return subprocess.run(["ip", "netns", "exec", lab.pod, "nft", "list", "table", "inet", "interceptd"],
                          capture_output=True).returncode == 0


@contextmanager
def first_agent(lab: Lab, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(run_in(lab, tmp_path / "a"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: table_present(lab), timeout=15)  # the claim is taken before the apply
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_a_second_agent_with_another_state_dir_is_refused(lab: Lab, tmp_path: Path) -> None:
    with first_agent(lab, tmp_path) as first:
        before = lab.nft_json()
        second = subprocess.run(run_in(lab, tmp_path / "b", "-b", "*"), capture_output=True, text=True, timeout=30)
        assert second.returncode == LockedError.exit_code == 1
        assert second.stderr == (f"interceptd: error: another interceptd (pid {first.pid}) already keeps table "
                                 "inet interceptd in this network namespace\n")
        assert lab.nft_json() == before  # refused before any change
        assert first.poll() is None
    # The first one gone, the name is free again.
    with first_agent(lab, tmp_path):
        pass


def test_a_claim_made_for_another_namespace_holds_there(lab: Lab, tmp_path: Path) -> None:
    """From the host namespace, the test claims the pod's table as the node agent would."""
    claim = TableClaim("interceptd", netns_path=f"/run/netns/{lab.pod}")
    assert claim.acquire() is True
    try:
        agent = subprocess.run(run_in(lab, tmp_path / "a"), capture_output=True, text=True, timeout=30)
        assert agent.returncode == 1 and "already keeps table inet interceptd" in agent.stderr
        assert not table_present(lab)
        peer = TableClaim("interceptd", netns_path=f"/run/netns/{lab.peer}")  # another namespace: no conflict
        assert peer.acquire() is True
        peer.release()
    finally:
        claim.release()
    with first_agent(lab, tmp_path):
        pass


def test_other_tables_in_the_namespace_are_not_concerned(lab: Lab, tmp_path: Path) -> None:
    table = "mesh"
    with first_agent(lab, tmp_path):
        other = subprocess.Popen(run_in(lab, tmp_path / "b", "--table", table), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        try:
            assert wait_until(lambda: subprocess.run(["ip", "netns", "exec", lab.pod, "nft", "list", "table",
                                                      "inet", table], capture_output=True).returncode == 0,
                              timeout=15), other.stderr
        finally:
            other.send_signal(signal.SIGTERM)
            other.wait(timeout=10)
