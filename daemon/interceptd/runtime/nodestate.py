"""What the CNI plugin and the node agent share: one state file per namespace, and the agent's socket.

The state file is the truth about a managed namespace: where it is, the settings its Config is built from,
and the normalised listing taken right after the last apply (the drift reference). The CNI plugin writes it
at ADD, so the node agent learns of a pod even when it was down at the time; the agent rewrites it after
each apply, and at start adopts a namespace whose kernel table still equals the reference without touching
it. The socket only makes the agent act at once instead of at its next scan.
"""

from __future__ import annotations

import _socket
import json
import os
import stat

from interceptd.config import Config, load
from interceptd.errors import NamespaceError, StateDirError
from interceptd.records import record
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Existing, Json, transaction
from interceptd.runtime import statedir
from interceptd.system.netns import is_name

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from hashlib import sha256
    from typing import Any
else:
    try:
        # The C module under hashlib, which loads OpenSSL (2.5 ms of every CNI ADD) for the same digest.
        from _sha256 import sha256
    except ImportError:  # Python 3.12 renamed it _sha2
        from hashlib import sha256

STATE_SUBDIR = "netns"
SOCKET_NAME = "node.sock"
SOURCES = ("cni", "dir")


@record
class Record:
    name: str
    path: str  # the namespace file (CNI_NETNS, or a file of the watched directory)
    source: str  # one of SOURCES
    settings: dict[str, Any]  # TOML keys: what the namespace's Config is built from
    listing: list[Json]  # normalised, right after the apply; empty when nothing was applied
    ruleset_digest: str = ""  # of the ruleset the listing was taken after
    container_id: str = ""
    # The pod opted out (interceptionMode NONE, an excluded Kubernetes namespace): no rules, and a node agent
    # that also finds this namespace in its watched directory leaves it alone.
    opted_out: bool = False
    # The pod's addresses from the previous plugin's result (prevResult.ips), without prefix lengths: what the
    # node agent's host probe sets hold for an ambient pod, also after a restart of the agent.
    addresses: tuple[str, ...] = ()
    pod: tuple[str, str] = ("", "")  # the Kubernetes namespace and pod name from CNI_ARGS, where given

    def config(self) -> Config:
        return settings_config(self.settings, f"state of network namespace {self.name}")


def settings_config(settings: dict[str, Any], where: str) -> Config:
    """A pod's Config: its settings alone, nothing from the environment of the plugin or the agent."""
    return load({}, {}, settings, where)


def ruleset_digest(ruleset: Ruleset) -> str:
    """Equal digests = the same ruleset (render is pure, the transaction from scratch is its full text)."""
    text = json.dumps(transaction(ruleset, Existing.empty()), sort_keys=True, separators=(",", ":"))
    return sha256(text.encode()).hexdigest()


def state_dir_of(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_SUBDIR)


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def _file(state_dir: str, name: str) -> str:
    """The record's path; a name that could leave the directory ('/', '..') is refused, never joined."""
    if not is_name(name):
        raise NamespaceError(f"network namespace name {name!r}: letters, digits, '.', '_', '-' only")
    return os.path.join(state_dir_of(state_dir), f"{name}.json")


def write(state_dir: str, record: Record) -> None:
    """Atomically (rename): a reader never sees half a file, a crash leaves the previous one."""
    statedir.ensure_private(state_dir)
    statedir.ensure_private(state_dir_of(state_dir))
    final = _file(state_dir, record.name)
    tmp = f"{final}.{os.getpid()}.tmp"
    _unlink(tmp)  # our own leftover from a crash (unlink never follows a link planted there)
    # json.dumps, not json.dump: only the one-shot form has the C encoder; and the record's own fields, not
    # asdict's deep copy of the listing (together 60% of a CNI ADD's time after start-up).
    text = json.dumps(vars(record), separators=(",", ":"))
    # O_EXCL|O_NOFOLLOW: a symlink or file planted under the temporary name is never written through.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, final)


def read(state_dir: str, name: str) -> Record | None:
    """The record, or None when there is none or it cannot be used (then the namespace is treated as new)."""
    try:
        fd = os.open(_file(state_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as fh:
            if os.fstat(fd).st_uid != os.geteuid():
                return None  # not written by us (nor by the CNI plugin, which runs as the same root)
            data = json.load(fh)
        record = Record(**{**data, "pod": tuple(data.get("pod", ("", ""))),
                           "addresses": tuple(data.get("addresses", ()))})
    except (OSError, ValueError, TypeError, RecursionError, NamespaceError):
        return None
    usable = (record.source in SOURCES and isinstance(record.settings, dict) and len(record.pod) == 2
              and all(isinstance(part, str) for part in record.pod))
    return record if usable else None


def exists(state_dir: str, name: str) -> bool:
    return os.path.exists(_file(state_dir, name))


def remove(state_dir: str, name: str) -> None:
    _unlink(_file(state_dir, name))


def _unlink(path: str) -> None:
    """os.unlink, a file already gone being fine."""
    try:  # noqa: SIM105 (contextlib.suppress: contextlib is no import of a CNI ADD)
        os.unlink(path)
    except FileNotFoundError:
        pass


def names(state_dir: str) -> list[str]:
    """The recorded namespaces. StateDirError when the records' directory is not a private one of ours: its
    records could have been planted by another user, and a record decides what gets intercepted."""
    directory = state_dir_of(state_dir)
    try:
        found = os.lstat(directory)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        raise StateDirError(f"state directory {directory!r}: must be a directory owned by uid {os.geteuid()}, not "
                            f"a symlink or a directory of uid {found.st_uid}; its records are not trusted")
    statedir.refuse_shared(directory, found.st_mode)
    entries = os.listdir(directory)
    return sorted(e[:-5] for e in entries if e.endswith(".json") and is_name(e[:-5]))


def request(state_dir: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One JSON line to the node agent, one JSON line back. OSError/ValueError when it is not there."""
    # _socket, the C module under `socket`: socket.py's enum wrappers and selectors would cost each CNI ADD 2 ms.
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path(state_dir))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:  # _socket's socket is no context manager
        sock.close()
    reply: dict[str, Any] = json.loads(data)
    return reply
