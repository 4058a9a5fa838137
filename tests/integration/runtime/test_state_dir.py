"""`interceptd run` in a lab namespace with a state directory other users can write: refused on one line
naming the directory and its mode, the directory left as it was (sticky bit included), no rules installed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from support.gaplab import CONFIG_A, AgentProc
from support.netlab import Lab, sh

pytestmark = pytest.mark.netns


def test_a_shared_state_directory_stops_the_agent_before_anything(lab: Lab, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = lab.interceptd("run", "-i", "*", "--metrics-address", "", "--state-dir", str(shared), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"interceptd: error: state directory {str(shared)!r} (--state-dir, key "
                                    f"'state_dir'): mode 1777 lets other users write to it")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and list(shared.iterdir()) == []
    assert "interceptd" not in sh("nft", "list", "tables", ns=lab.pod).stdout


def test_the_agent_runs_in_a_private_subdirectory_of_it(lab: Lab, tmp_path: Path) -> None:
    """What the Kubernetes manifests do with their 0777 emptyDir."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    agent = AgentProc(lab, tmp_path, "--state-dir", str(shared / "state"))  # the last --state-dir wins
    agent.write_config(CONFIG_A)
    try:
        agent.start()
        assert stat.S_IMODE((shared / "state").stat().st_mode) == 0o700
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert [p.name.split(".")[0] for p in (shared / "state").iterdir()] == ["interceptd"]  # its lock
    finally:
        agent.close()
