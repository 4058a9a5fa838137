"""One agent per table and network namespace: an flock(2) on a file under the state directory.

The kernel drops the lock when the process dies, so a crashed agent never blocks its successor. The file
is opened with O_NOFOLLOW and O_NONBLOCK and must be a regular file with one link, owned by us: a symlink,
hard link or FIFO planted in the state directory cannot redirect the write or hang the agent. The directory
is created private (0700) and must be a real directory of ours that nobody else can write to (statedir).
"""

from __future__ import annotations

import fcntl
import os
import stat

from interceptd.errors import LockedError
from interceptd.runtime.statedir import refuse_shared


def netns_id() -> int:
    """The inode of this process's network namespace: agents in other namespaces do not conflict."""
    return os.stat("/proc/self/ns/net").st_ino


def lock_path(state_dir: str, table: str) -> str:
    return os.path.join(state_dir, f"{table}.net{netns_id()}.lock")


class Lock:
    def __init__(self, state_dir: str, table: str) -> None:
        self.path = lock_path(state_dir, table)
        self._table = table
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockedError naming the holder; writes our pid into the file."""
        directory = os.path.dirname(self.path)
        where = f"--state-dir {directory!r}"
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # Opened without following a symlink and used through the descriptor from here on, so the path
            # cannot be swapped under us. One that is not ours, or that others may write to, is refused.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise LockedError(f"{where}: cannot open the directory: {exc.strerror} (it must be a directory, "
                              f"not a symlink)") from None
        try:
            dir_stat = os.fstat(dir_fd)
            if dir_stat.st_uid != os.geteuid():
                raise LockedError(f"{where}: must be a directory owned by uid {os.geteuid()}, not uid "
                                  f"{dir_stat.st_uid}")
            refuse_shared(directory, dir_stat.st_mode)
            fd = os.open(os.path.basename(self.path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise LockedError(f"{where}: cannot open lock file {self.path!r}: {exc.strerror}") from None
        finally:
            os.close(dir_fd)
        try:
            file_stat = os.fstat(fd)
            if not stat.S_ISREG(file_stat.st_mode) or file_stat.st_nlink != 1 or file_stat.st_uid != os.geteuid():
                raise LockedError(f"{where}: lock file {self.path!r} is not a regular file of ours with one link")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise LockedError(f"another interceptd (pid {holder}) already keeps table inet {self._table} "
                                  f"in this network namespace (lock {self.path!r})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
