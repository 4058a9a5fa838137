"""Least privilege: interceptd needs CAP_NET_ADMIN and nothing else; its metrics answer only where told.

Every other capability is dropped from the bounding set with capsh (libcap2-bin) after `ip netns exec`
entered the pod namespace, so even uid 0 gets only CAP_NET_ADMIN across execve.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from support.gaplab import CONFIG_A, AgentProc
from support.netlab import INTERCEPTD, Lab, call_in, sh, wait_until

CAP_NET_ADMIN = 12


def only_net_admin() -> list[str]:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    drop = ",".join(str(cap) for cap in range(last + 1) if cap != CAP_NET_ADMIN)
    return ["capsh", f"--drop={drop}", "--", "-c", 'exec "$0" "$@"']


def cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)


def test_apply_status_and_run_with_only_cap_net_admin(lab: Lab, tmp_path: Path) -> None:
    lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
    lab.serve(lab.peer, "peer", tcp=[9999])
    capped = [*only_net_admin(), INTERCEPTD]
    for args in (["apply", "-i", "198.51.100.0/24", "-b", "*", "-m", "TPROXY"], ["status"], ["cleanup"]):
        result = sh(*capped, *args, ns=lab.pod, check=False)
        assert result.returncode == 0, (args, result.stderr)
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG_A)
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, *capped, "run", "--config", str(config),
                             "--state-dir", str(tmp_path / "run"), "--log-format", "json"], stdout=log, stderr=log)
    try:
        assert wait_until(lambda: b'"event": "start"' in (tmp_path / "agent.log").read_bytes(), timeout=15)
        assert cap_eff(proc.pid) == 1 << CAP_NET_ADMIN
        assert b'"error": null' in (tmp_path / "agent.log").read_bytes()
        assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000).startswith("pod 15001 ")
        sh("nft", "flush", "table", "inet", "interceptd", ns=lab.pod)  # the repair needs the same capability
        assert wait_until(lambda: b'"event": "repair"' in (tmp_path / "agent.log").read_bytes())
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: b'"event": "reload"' in (tmp_path / "agent.log").read_bytes())
        assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000).startswith("pod 15001 ")
        assert b'"level": "error"' not in (tmp_path / "agent.log").read_bytes(), (tmp_path / "agent.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()
    assert proc.returncode == 0


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("address", "answers", "silent"), [
    ("127.0.0.1:15321", ["127.0.0.1"], ["192.0.2.2"]),
    ("192.0.2.2:15321", ["192.0.2.2"], ["127.0.0.1"]),
])
def test_metrics_answer_only_on_the_configured_address(lab: Lab, tmp_path: Path, address: str,
                                                       answers: list[str], silent: list[str]) -> None:
    agent = AgentProc(lab, tmp_path)
    agent.write_config(CONFIG_A.replace('metrics_address = ""', f'metrics_address = "{address}"'))
    agent.start()
    try:
        for host in answers:
            assert call_in(lab.pod, _connects, host, 15321)
        for host in silent:
            assert not call_in(lab.pod, _connects, host, 15321)
        # From the peer: only a pod address can answer, and only if it is the configured one.
        assert call_in(lab.peer, _connects, "192.0.2.2", 15321) == ("192.0.2.2" in answers)
    finally:
        agent.close()
