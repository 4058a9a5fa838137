"""Descriptor discipline: keep the low descriptors free for libnftables.

libnftables waits for the kernel's answer with select(2) on the netlink socket it opens for each call, and
select's fd_set only holds descriptors 0-1023: when that socket gets descriptor 1024 or more, glibc aborts
the whole process (`*** bit out of range 0 - FD_SETSIZE on fd_set ***`) and the repairs stop; when it cannot
open the socket at all, libnftables calls exit(). A new descriptor is always the lowest free one.

So every descriptor that lives long or that outsiders can make us open in numbers (kernel event sockets and
their epoll, the CNI socket, directory watches, the loop's pipe, a listener and its clients) moves to 1024 and
above: `raise_nofile_limit()` once at start (the soft RLIMIT_NOFILE up to the hard limit, systemd's default
being 1024 soft / 524288 hard), then `move_high()` for each. Their number must still be bounded by the caller:
moving them only keeps the low range free. `low_descriptor_free` is the guard taken before each libnftables
call on a fresh context: when no low descriptor is free, that one operation fails cleanly (ResourceError,
a retry), never the process.
"""


from __future__ import annotations

import fcntl
import os

from interceptd.errors import ResourceError

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    import socket  # at run time only in move_high, whose caller with a socket has imported it: not on apply's path
    from typing import TypeVar

    Fd = TypeVar("Fd", int, socket.socket)

FD_SETSIZE = 1024  # the first descriptor select(2) cannot watch
# Kept free below FD_SETSIZE for what libnftables and one apply open at once (a context, netlink sockets for
# routes, a namespace file, a pipe or two), and for Python's own transient descriptors.
LOW_HEADROOM = 16


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (nothing to ask for: any process may); returns the
    soft limit now in force. Idempotent, so every component that needs high descriptors may call it.
    The agents' call: `resource` is imported here, not by a one-shot apply."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # the kernel caps the limit at fs.nr_open
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def move_high(fd: Fd) -> Fd:
    """`fd` (a socket, or a bare descriptor: pipe, inotify, netlink) moved to a close-on-exec descriptor
    >= FD_SETSIZE; the original descriptor is closed.

    When the limit leaves no room up there (a hard limit of 1024, or all taken), `fd` is returned as it
    was: the caller's bound on how many it holds is then what leaves libnftables room.
    """
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:  # EINVAL: the soft limit is at most FD_SETSIZE; EMFILE: nothing free above it
        return fd
    if isinstance(fd, int):
        os.close(fd)
        return high
    import socket

    moved = socket.socket(fileno=high)
    moved.setblocking(fd.getblocking())
    fd.close()
    return moved


def low_descriptor_free(what: str) -> None:
    """Raise ResourceError unless a descriptor below FD_SETSIZE - LOW_HEADROOM is free for `what`."""
    try:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ResourceError(f"{what}: no descriptor left ({exc.strerror}); the operation was not attempted") \
            from None
    os.close(fd)
    if fd >= FD_SETSIZE - LOW_HEADROOM:
        raise ResourceError(f"{what}: no descriptor below {FD_SETSIZE - LOW_HEADROOM} is free (libnftables cannot "
                            f"use a higher one); the operation was not attempted")
