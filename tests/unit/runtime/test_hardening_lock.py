"""The lock file cannot be abused: planted links and foreign or shared state directories are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from interceptd.errors import LockedError, StateDirError
from interceptd.runtime.lockfile import Lock, lock_path

pytestmark = pytest.mark.usefixtures("own_netns")


def test_state_dir_is_created_private_and_the_lock_file_0600(tmp_path: Path) -> None:
    lock = Lock(str(tmp_path / "a" / "run"), "interceptd")
    lock.acquire()
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "run").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o600
    lock.release()


def test_hard_link_to_a_victim_is_refused_and_the_victim_kept(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "run"
    state.mkdir(mode=0o700)
    os.link(victim, lock_path(str(state), "interceptd"))
    with pytest.raises(LockedError, match="one link"):
        Lock(str(state), "interceptd").acquire()
    assert victim.read_text() == "precious"


def test_symlinked_state_dir_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, tmp_path / "run")
    with pytest.raises(LockedError, match="not a symlink"):
        Lock(str(tmp_path / "run"), "interceptd").acquire()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_a_state_dir_others_can_write_is_refused_and_left_as_it_is(tmp_path: Path, mode: int) -> None:
    """Re-moding it would break whoever shares it (a 1777 directory lost its sticky bit): refuse, name it."""
    state = tmp_path / "run"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(StateDirError) as err:
        Lock(str(state), "interceptd").acquire()
    assert str(err.value).startswith(f"state directory {str(state)!r} (--state-dir, key 'state_dir'): mode "
                                     f"{mode:04o} lets other users write to it")
    assert stat.S_IMODE(state.stat().st_mode) == mode and list(state.iterdir()) == []


def test_a_subdirectory_of_a_shared_directory_is_created_private(tmp_path: Path) -> None:
    """What the Kubernetes manifests do with their 0777 emptyDir: --state-dir names a subdirectory of it."""
    shared = tmp_path / "emptydir"
    shared.mkdir()
    shared.chmod(0o1777)
    lock = Lock(str(shared / "state"), "interceptd")
    lock.acquire()
    assert stat.S_IMODE((shared / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    lock.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_state_dir_of_someone_else_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "run"
    state.mkdir(mode=0o700)
    os.chown(state, 1000, 1000)
    with pytest.raises(LockedError, match="owned by uid 0, not uid 1000"):
        Lock(str(state), "interceptd").acquire()
    assert list(state.iterdir()) == []
