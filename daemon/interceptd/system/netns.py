"""Work inside another network namespace from one thread: setns(2) in, do the work, setns back.

setns(2) moves only the calling thread, so the node agent's HTTP threads stay in the host namespace while
its main thread visits pods. Whatever binds to a namespace when it is created (a libnftables context, a
netlink socket) keeps working on that namespace after the thread has come back, so the agent enters a pod
only to create those handles and to change routes; reading a pod's table needs no setns at all.
"""

from __future__ import annotations

import _thread
import ctypes
import fcntl
import os
import re
import sys

from interceptd.errors import NamespaceError
from interceptd.system.fds import move_high

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
_libc = ctypes.CDLL(None, use_errno=True)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PROC_NS = re.compile(r"^/proc/(\d+)/ns/net$")

Identity = tuple[int, int]  # (st_dev, st_ino) of the nsfs inode: the same namespace under any path


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def identity(path: str) -> Identity | None:
    """The namespace's identity, or None when `path` is not (or no longer) a *network* namespace.

    Every namespace inode lives on the one nsfs device; a plain file (an `ip netns add` not yet bind-mounted, or
    left behind) does not. Other kinds of namespace (mount, pid, ...) live there too: the kernel's
    NS_GET_NSTYPE tells them apart, so a bind mount of another kind is never taken for a pod.
    """
    try:
        st = os.stat(path)
        home = os.stat("/proc/thread-self/ns/net")
    except OSError:
        return None
    if st.st_dev != home.st_dev:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino) if kind == CLONE_NEWNET else None


def on_nsfs(path: str) -> bool:
    """Is `path` a namespace file of any kind (a bind mount of /proc/PID/ns/*), as opposed to a plain file?"""
    try:
        return os.stat(path).st_dev == os.stat("/proc/thread-self/ns/net").st_dev
    except OSError:
        return False


def is_name(text: str) -> bool:
    """Is `text` usable as a namespace's short name (a state file name, a label): no '/', no '..'."""
    return bool(_NAME.fullmatch(text)) and text not in (".", "..")


def name_for(path: str) -> str:
    """The namespace's short name (metrics label, state file): the file name, or pid-N for /proc/N/ns/net."""
    match = _PROC_NS.match(os.path.normpath(path))
    name = f"pid-{match.group(1)}" if match else os.path.basename(os.path.normpath(path))
    if not is_name(name):
        raise NamespaceError(f"network namespace {path!r}: {name!r} is not usable as a name "
                             f"(letters, digits, '.', '_', '-'; at most 128)")
    return name


_one_at_a_time = _thread.RLock()  # threading's RLock itself; importing threading costs a CNI ADD 0.5 ms


class entered:  # lower case: it reads as a function, `with entered(path):`
    """Run the block with the calling thread inside the network namespace at `path`.

    One thread at a time (the node agent's loop, or a metrics scrape opening a pod's libnftables context).
    A class, not contextlib.contextmanager: a CNI ADD does not import contextlib.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._home = -1

    def __enter__(self) -> None:
        _one_at_a_time.acquire()
        try:
            self._home = _enter(self._path)
        except BaseException:
            _one_at_a_time.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            _setns(self._home)
        except OSError as err:
            # Carrying on would apply the next pod's rules in this one: stop, the restart re-adopts.
            print(f"interceptd: fatal: cannot return from network namespace {self._path!r}: {err.strerror}",
                  file=sys.stderr)
            os._exit(70)
        finally:
            os.close(self._home)
            _one_at_a_time.release()


def _enter(path: str) -> int:
    """Move the calling thread into the namespace at `path`; returns a descriptor of the one it was in."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError(f"network namespace {path!r}: cannot open: {exc.strerror}") from None
        try:
            _setns(fd)
        except OSError as exc:
            raise NamespaceError(f"network namespace {path!r}: cannot enter: {exc.strerror}") from None
        finally:
            os.close(fd)
    except BaseException:
        os.close(home)
        raise
    return home


IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x4, 0x8, 0x40, 0x80, 0x100, 0x200
ENTRY_CHANGES = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
# A directory of files (the node's live pod settings): a file written in place too, and a ConfigMap's `..data`
# symlink swapped by rename (IN_MOVED_TO).
FILE_CHANGES = ENTRY_CHANGES | IN_CLOSE_WRITE


class DirWatch:
    """inotify on one directory: readable when an entry appears, goes or changes (the caller rescans).

    `ip netns add` creates the file before it bind-mounts the namespace on it (no event for the mount), so
    a caller finding a plain file must look again shortly; netns.identity tells the two apart.
    """

    def __init__(self, path: str, mask: int = ENTRY_CHANGES) -> None:
        fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if _libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path!r}: {os.strerror(err)}")
        self._fd = move_high(fd)  # long-lived: keep the low descriptors for libnftables

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> None:
        try:  # not contextlib.suppress: a CNI ADD does not import contextlib
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._fd)
