"""The node agent's and the CNI plugin's state records live only in a directory nobody else can write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from interceptd.errors import StateDirError
from interceptd.runtime import nodestate

RECORD = nodestate.Record("pod-a", "/run/netns/pod-a", "cni", {"envoy_port": 15001})


def test_records_are_written_into_private_directories(tmp_path: Path) -> None:
    state = tmp_path / "state"
    nodestate.write(str(state), RECORD)
    for directory in (state, state / nodestate.STATE_SUBDIR):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert nodestate.read(str(state), "pod-a") == RECORD


@pytest.mark.parametrize("shared", ["", nodestate.STATE_SUBDIR])
def test_a_shared_state_directory_is_refused_not_re_moded(tmp_path: Path, shared: str) -> None:
    state = tmp_path / "state"
    (state / nodestate.STATE_SUBDIR).mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (state / shared).chmod(0o1777)
    with pytest.raises(StateDirError, match="mode 1777 lets other users write to it"):
        nodestate.write(str(state), RECORD)
    assert stat.S_IMODE((state / shared).stat().st_mode) == 0o1777
    assert nodestate.names(str(state)) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_state_directory_of_someone_else_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 1000, 1000)
    with pytest.raises(StateDirError, match="not a symlink or a directory of uid 1000"):
        nodestate.write(str(state), RECORD)
