"""The node agent's and the CNI plugin's state records live only in a directory nobody else can write."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from interceptd.errors import StateDirError
from interceptd.runtime import nodestate

RECORD = nodestate.Record("pod-a", "/run/netns/pod-a", "cni", {"envoy_port": 15001}, [])


def test_records_are_written_into_private_directories(tmp_path: Path) -> None:
    state = tmp_path / "state"
    nodestate.write(str(state), RECORD)
    for directory in (state, state / nodestate.STATE_SUBDIR):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert nodestate.read(str(state), "pod-a") == RECORD


def _share(directory: Path) -> None:
    directory.chmod(0o1777)


def _give_away(directory: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    os.chown(directory, 1000, 1000)


@pytest.mark.parametrize(("subdir", "spoil", "words"), [
    ("", _share, "mode 1777 lets other users write to it"),
    (nodestate.STATE_SUBDIR, _share, "mode 1777 lets other users write to it"),
    ("", _give_away, "not a symlink or a directory of uid 1000"),
])
def test_a_state_directory_others_control_is_refused_and_left_alone(tmp_path: Path, subdir: str,
                                                                    spoil: Callable[[Path], None],
                                                                    words: str) -> None:
    state = tmp_path / "state"
    (state / nodestate.STATE_SUBDIR).mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    spoil(state / subdir)
    before = (state / subdir).stat()
    with pytest.raises(StateDirError, match=words):
        nodestate.write(str(state), RECORD)
    after = (state / subdir).stat()
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    if subdir:  # records in a directory others can write are never listed as ours
        with pytest.raises(StateDirError, match=words):
            nodestate.names(str(state))
    else:
        assert nodestate.names(str(state)) == []
