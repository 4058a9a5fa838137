"""systemd/interceptd.service: accepted by `systemd-analyze verify`, and carries the agent's contract."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from interceptd.runtime import httpd
from interceptd.system import fds

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "systemd" / "interceptd.service"
INSTALLED = "/usr/local/bin/interceptd"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing: `make deps` installs Debian's systemd package")
@pytest.mark.parametrize("without_man_pages", [False, True], ids=["this-machine", "no-man-pages"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, without_man_pages: bool) -> None:
    # verify insists that ExecStart's binary exists: point it at this checkout's entry point.
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / "interceptd.service"
    copy.write_text(text.replace(INSTALLED, str(ROOT / ".venv" / "bin" / "interceptd")))
    env = dict(os.environ)
    if without_man_pages:
        # A fresh Debian 12 machine has no man pages: `man nft` fails there, and verify would report the
        # unit's Documentation=man:nft(8) as an error although the unit is fine.
        empty = tmp_path / "man"
        empty.mkdir()
        env["MANPATH"] = str(empty)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_unit_is_a_hardened_notify_service() -> None:
    d = directives()
    assert d["Type"] == ["notify"] and d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"] and d["WatchdogSec"] and d["RuntimeDirectory"] == ["interceptd"]
    assert d["ExecStart"][0].startswith(f"{INSTALLED} run ")
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"] and d["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert d[key] == [value], key
    assert "PrivateNetwork" not in d  # the agent must see the namespace it guards


def test_descriptor_limits_leave_room_above_fd_setsize_for_the_metrics_clients() -> None:
    """Soft 1024 (what select(2) users expect), a hard limit the agent raises to: room for the bounded
    metrics clients, the listener and the server's pipe above descriptor 1023."""
    (value,) = directives()["LimitNOFILE"]
    soft, hard = (int(v) for v in value.split(":"))
    assert soft == fds.FD_SETSIZE
    assert hard >= fds.FD_SETSIZE + httpd.MAX_CONNECTIONS + 3
