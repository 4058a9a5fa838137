"""The node agent's readiness file: present exactly while every pod it knows holds its verified ruleset.

A DaemonSet's readiness probe (`test -f`), or a controller that removes a node's startup taint, can wait for
this file without speaking HTTP: pods are then scheduled on the node only once its agent keeps every pod's
rules. It is written atomically (rename), so a reader never sees half of it, and removed when the agent
stops or any pod is not verified.
"""

from __future__ import annotations

import contextlib
import os

READY_FILE = "node-ready"


class ReadyFile:
    """The file in the state directory; rewritten only when readiness or the count of pods changes."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, READY_FILE)
        self._shown: tuple[bool, int] | None = None

    def show(self, ready: bool, pods: int) -> None:
        """Create the file (naming how many pods were verified) when ready, remove it when not. OSError when
        the state directory cannot be written."""
        if self._shown == (ready, pods):
            return
        if ready:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"ready: every known pod verified ({pods})\n")
            os.replace(tmp, self.path)
        else:
            self.clear()
        self._shown = (ready, pods)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._shown = None
