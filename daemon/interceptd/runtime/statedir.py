"""The state directory (lock files, the node agent's socket and per-namespace records) must be private.

Anyone who can write to it can plant or replace what the agent and the CNI plugin trust, so a directory
others may write to is refused, never re-moded: changing its mode would break whoever shares it (a 1777
directory loses its sticky bit). A shared parent is fine: name a subdirectory, which interceptd creates
with mode 0700 (a Kubernetes emptyDir is 0777: its subdirectory `state` is what the manifests use).
"""

from __future__ import annotations

import os
import stat

from interceptd.errors import StateDirError


def refuse_shared(directory: str, mode: int) -> None:
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(f"state directory {directory!r} (--state-dir, key 'state_dir'): mode "
                            f"{stat.S_IMODE(mode):04o} lets other users write to it; name a subdirectory instead "
                            f"(e.g. {os.path.join(directory, 'state')!r}), interceptd creates it with mode 0700")


def ensure_private(directory: str) -> None:
    """Create `directory` with mode 0700, or check that the one there is a real directory of ours that
    nobody else can write to."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    found = os.lstat(directory)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        raise StateDirError(f"state directory {directory!r} (--state-dir, key 'state_dir'): must be a directory "
                            f"owned by uid {os.geteuid()}, not a symlink or a directory of uid {found.st_uid}")
    refuse_shared(directory, found.st_mode)
