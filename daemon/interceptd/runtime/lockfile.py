"""One agent per table and network namespace: an flock(2) on a file under the state directory, and a
claim on the table inside the network namespace itself (TableClaim) that no --state-dir can sidestep.

The kernel drops the lock when the process dies, so a crashed agent never blocks its successor. The file
is opened with O_NOFOLLOW and O_NONBLOCK and must be a regular file with one link, owned by us: a symlink,
hard link or FIFO planted in the state directory cannot redirect the write or hang the agent. The directory
is created private (0700) and must be a real directory of ours that nobody else can write to (statedir).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct

from interceptd.errors import LockedError
from interceptd.runtime import logs
from interceptd.runtime.statedir import refuse_shared
from interceptd.system import fds, netns


def netns_id() -> int:
    """The inode of this process's network namespace: agents in other namespaces do not conflict."""
    return os.stat("/proc/self/ns/net").st_ino


def lock_path(state_dir: str, table: str) -> str:
    return os.path.join(state_dir, f"{table}.net{netns_id()}.lock")


CAP_NET_ADMIN = 12
GONE = "it does not listen, as interceptd does (or has just exited)"


def claim_address(table: str, family: str = "inet") -> str:
    """The abstract unix socket name that stands for "an interceptd keeps this table here"."""
    return f"\0interceptd/table/{family}/{table}"


class TableClaim:
    """An abstract unix socket bound inside the network namespace, named after the table.

    Why this and not (only) a file: the file lock lives under --state-dir, so two agents given different
    state directories (or two containers of one pod, each with its own /run) never saw each other and
    fought over one table. Abstract unix socket names are scoped by network namespace, which is exactly the
    scope of an nftables table; they need no file system, no cleanup (the name goes with the last
    descriptor, also on SIGKILL) and no permission. A namespace other than the caller's (the node agent
    claims one per pod) is claimed by creating the socket inside it (system.netns.entered): the socket
    stays in the namespace it was created in.

    No permission also means any process in the namespace, the pod's own application included, may bind
    the name first. Such a squatter must not keep the repairs from starting, so the name only stops us
    when its holder could itself keep the table: it has CAP_NET_ADMIN (read from /proc when its pid is
    visible to us), or, in another pid namespace, runs as root or as our own uid. Otherwise, and when the
    holder cannot be asked at all, the claim is skipped with a warning and the file lock remains.
    """

    def __init__(self, table: str, family: str = "inet", netns_path: str = "") -> None:
        """`netns_path`: a network namespace file to claim the table in; "" for the caller's namespace."""
        self.table = table
        self.family = family
        self._netns = netns_path
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        with netns.entered(self._netns) if self._netns else contextlib.nullcontext():
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def acquire(self) -> bool:
        """Claim the table; LockedError names a rival holder. False: claimed by a process that cannot be a
        rival (see the class docstring), and we carry on without the claim."""
        address = claim_address(self.table, self.family)
        retried = False  # a holder that exits between our bind and our question: bind once more
        while True:
            sock = self._socket()
            try:
                sock.bind(address)
                sock.listen(socket.SOMAXCONN)  # a rival's question is answered by the kernel: nothing to accept
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise LockedError(f"cannot claim table {self.family} {self.table} in the network namespace: "
                                      f"{exc.strerror}") from None
                pid, uid, why = self._holder(address)
                if why is None:
                    raise LockedError(f"another interceptd (pid {pid or 'in another pid namespace'}) already keeps "
                                      f"table {self.family} {self.table} in this network namespace") from None
                if why == GONE and not retried:
                    retried = True
                    continue
                logs.get(table=self.table).warning(
                    "table-claim-skipped", holder_pid=pid or None, holder_uid=uid, reason=why,
                    note="another process holds the name that marks this table as kept; it cannot be an "
                         "interceptd, so this one starts")
                return False
            self._sock = fds.move_high(sock)
            return True

    def _holder(self, address: str) -> tuple[int, int | None, str | None]:
        """(pid, uid, None) for a rival holder; a reason string when the holder cannot be one."""
        with self._socket() as probe:
            try:
                probe.connect(address)
            except BlockingIOError:
                return 0, None, "its queue is full, it cannot be asked"
            except ConnectionRefusedError:  # also what a name nobody holds any more answers
                return 0, None, GONE
            except OSError as exc:
                return 0, None, f"it cannot be asked: {exc.strerror}"
            pid, uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
        if pid > 0:
            return (pid, uid, None) if _has_net_admin(pid) else (pid, uid, "it lacks CAP_NET_ADMIN")
        return (pid, uid, None) if uid in (0, os.geteuid()) else (pid, uid, "an unprivileged user of another "
                                                                             "pid namespace")

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _has_net_admin(pid: int) -> bool:
    """Whether the process has CAP_NET_ADMIN in effect; a process that is gone or unreadable counts as having
    it (it was bound a moment ago by someone who may be a rival: refusing is the safe side then)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return True


class Lock:
    """The state directory's lock file and the namespace's TableClaim, taken and released together."""

    def __init__(self, state_dir: str, table: str, family: str = "inet") -> None:
        """`family` names the claim's kind: the node agent claims "node" in family "node", a name no nftables
        table can have, so it never clashes with an agent keeping a table called node."""
        self.path = lock_path(state_dir, table)
        self._table = table
        self._fd: int | None = None
        self.claim = TableClaim(table, family)

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
            self.claim.acquire()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        self.claim.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
