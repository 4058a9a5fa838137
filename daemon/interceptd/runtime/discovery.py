"""Which network namespaces the node agent should keep, and which it must refuse, from two sources.

- The CNI plugin's records in the state directory: a pod it applied at ADD (with the pod's own settings), or
  one that opted out (interceptionMode NONE, an excluded Kubernetes namespace) and so stays out whatever
  directory its namespace shows in. Records are trusted only in a private directory of ours.
- The watched directory (--netns-dir): only root's own network-namespace bind mounts. A symlink (it could point
  at any namespace, e.g. /proc/self/ns/net), a namespace of another kind, a file of another user and the node
  agent's own namespace are refused, each with the reason, never followed.

A CNI registration wins over the same namespace in the watched directory. Nothing here changes the kernel; a
record of a namespace that went is removed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from interceptd.errors import ConfigError, NamespaceError, StateDirError
from interceptd.runtime import nodestate
from interceptd.system import netns

STATE_RECORDS = "state-directory"  # how /readyz and the metric name untrusted CNI records (not a namespace)


@dataclass(frozen=True)
class Source:
    """Where a managed namespace came from; a different Source under the same name is a new namespace."""

    name: str
    path: str
    kind: str  # "cni" or "dir"
    ident: netns.Identity


@dataclass
class Found:
    found: dict[str, tuple[Source, nodestate.Record | None]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why it is not taken
    pending: bool = False  # a namespace file not yet bind-mounted (`ip netns add` is two steps): look again soon


def discover(netns_dir: str, state_dir: str, identity: Callable[[str], netns.Identity | None],
             own: netns.Identity | None, managed: Mapping[str, Source]) -> Found:
    """What should be managed now. `managed`: what is managed already (its records need no reading: we wrote
    them, and parsing a listing per namespace on every pass was most of a pass's time at 1,000 pods)."""
    out = Found()
    records: dict[str, nodestate.Record | None] = {}
    opted_out: set[netns.Identity] = set()
    try:
        recorded = nodestate.names(state_dir)
    except StateDirError as exc:  # planted records are never trusted; the watched directory still is
        out.refused[STATE_RECORDS] = str(exc)
        recorded = []
    for name in recorded:
        source = managed.get(name)
        if source is not None and identity(source.path) == source.ident:
            records[name] = None
            if source.kind == "cni":
                out.found[name] = (source, None)
            continue
        record = records[name] = nodestate.read(state_dir, name)
        if record is None or record.source != "cni":
            continue
        ident = identity(record.path)
        if ident is None:  # the pod is gone and nobody said DEL (e.g. while the node rebooted)
            nodestate.remove(state_dir, name)
        elif record.opted_out:
            opted_out.add(ident)
        elif ident == own:
            out.refused[name] = f"{record.path!r} is the node agent's own network namespace: never managed"
        else:
            out.found[name] = (Source(name, record.path, "cni", ident), record)
    if netns_dir:
        _watched(netns_dir, identity, own, opted_out, records, out)
    for name, record in records.items():
        if name not in out.found and name not in managed and record is not None and record.source == "dir":
            nodestate.remove(state_dir, name)  # its namespace went while the agent was away
    return out


def _watched(directory: str, identity: Callable[[str], netns.Identity | None], own: netns.Identity | None,
             opted_out: set[netns.Identity], records: Mapping[str, nodestate.Record | None], out: Found) -> None:
    cni = {source.ident for source, _ in out.found.values()}
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        path = os.path.join(directory, entry)
        refused = not_a_pod_file(path)
        ident = None if refused else identity(path)
        if not refused and ident is None and netns.on_nsfs(path):
            refused = "is a namespace of another kind, not a network namespace"
        elif ident is not None and ident == own:
            refused = "is the node agent's own network namespace: never managed"
        if refused:
            out.refused[entry] = f"{path!r} {refused}"
            continue
        if ident is None:
            out.pending = out.pending or os.path.isfile(path)
            continue
        if entry in out.found or ident in cni or ident in opted_out:
            continue  # the CNI's registration (the pod's own settings, or its opt-out) wins
        try:
            name = netns.name_for(path)
        except NamespaceError as exc:
            out.refused[entry] = str(exc)
            continue
        record = records.get(name)
        out.found[name] = (Source(name, path, "dir", ident), record if record and record.source == "dir" else None)


def not_a_pod_file(path: str) -> str:
    """Why a watched directory's entry is not trusted as a pod's namespace file ("" when it is): it must be a
    file of root's itself (a bind mount target), not a symlink that could point at any namespace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is gone"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink, not a namespace bind mount: never followed"
    if st.st_uid not in (0, os.geteuid()):
        return f"belongs to uid {st.st_uid}, not root: not trusted as a pod's namespace"
    return ""


def check_netns_dir(directory: str) -> None:
    """The watched directory must be root's and writable by root only: whoever can add an entry there decides
    what the node agent intercepts. A directory others can write is refused, never fixed silently."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise ConfigError(f"--netns-dir {directory!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--netns-dir {directory!r}: must be a directory (not a symlink)")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"--netns-dir {directory!r}: must belong to root and be writable by root only "
                          f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): whoever can add a file "
                          f"there decides what is intercepted")
