"""A running pod's live settings: one TOML file per pod in the node's configuration directory.

The node agent's configuration directory (--netns-config-dir) may hold a file per pod, with the same keys as
the node's configuration file, named after the pod's Kubernetes namespace and name as the CNI plugin recorded
them from CNI_ARGS (`<namespace>_<pod>.toml`), or else after its network namespace (`<netns>.toml`). Its keys
override the pod's own settings (a CNI pod's ADD settings; for a namespace of the watched directory, the
node's file), so changing the file changes the running pod's rules, without a restart of the pod.

The directory may be a mounted ConfigMap: its files are then symlinks into `..data`, a symlink the kubelet
swaps atomically on each update. So the directory is watched for every kind of entry change (system.netns
.DirWatch), a file is read through its symlinks, and what counts as a change is the bytes a pod's file holds,
compared with what was last applied: a swap that leaves a pod's file as it was touches nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from interceptd.config import Config, load, read_toml
from interceptd.config.values import MAX_CONFIG_BYTES
from interceptd.runtime import nodestate
from interceptd.system.netns import is_name

Pod = tuple[str, str]  # the Kubernetes namespace and pod name; ("", "") when not known
NO_POD: Pod = ("", "")


def stems(name: str, pod: Pod) -> list[str]:
    """The file names (without .toml) that may hold the pod's settings, the first found wins."""
    out = [f"{pod[0]}_{pod[1]}"] if all(pod) and is_name(f"{pod[0]}_{pod[1]}") else []
    return [*out, name]


def settings_path(directory: str, name: str, pod: Pod) -> str:
    """The pod's settings file: the first of its names that exists, else the one named after its netns."""
    candidates = [os.path.join(directory, f"{stem}.toml") for stem in stems(name, pod)]
    return next((p for p in candidates if os.path.exists(p)), candidates[-1])


def label(pod: Pod) -> str:
    """`namespace/pod` for a log line, or "" when the pod's Kubernetes name is not known."""
    return "/".join(pod) if all(pod) else ""


class PodFiles:
    """Which file holds each pod's live settings, and whether its bytes changed since they were last taken."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._taken: dict[str, tuple[str, bytes | None]] = {}  # netns name -> (file, bytes) last taken

    def _current(self, name: str, pod: Pod) -> tuple[str, bytes | None]:
        if not self.directory:
            return "", None
        path = settings_path(self.directory, name, pod)
        try:
            with open(path, "rb") as fh:  # through a ConfigMap's symlinks
                return path, fh.read(MAX_CONFIG_BYTES + 1)
        except OSError:
            return path, None  # gone, or half-swapped: read_toml says why if it is still missing at load

    def take(self, name: str, pod: Pod) -> None:
        """Note the file's bytes as applied (the pod was just configured from them)."""
        self._taken[name] = self._current(name, pod)

    def changed(self, name: str, pod: Pod) -> bool:
        """Did the pod's file (which one, or its bytes) change since it was taken? Takes it if so."""
        now = self._current(name, pod)
        if self._taken.get(name) == now:
            return False
        self._taken[name] = now
        return True

    def forget(self, name: str) -> None:
        self._taken.pop(name, None)


def cni_loader(record: nodestate.Record, directory: str) -> Callable[[], Config]:
    """How a CNI pod's Config is (re-)built: its ADD settings, overridden by its live settings file."""

    def config() -> Config:
        if directory:
            path = settings_path(directory, record.name, record.pod)
            if os.path.exists(path):
                return load({}, {}, {**record.settings, **read_toml(path)}, path)
        return record.config()

    return config


def dir_loader(flags: Mapping[str, str], config_path: str | None, directory: str,
               env: Mapping[str, str] | None = None) -> Callable[[str], Config]:
    """name -> Config of a watched-directory namespace: the node's file, then its live settings file, then the
    environment and the flags."""

    def config_for(name: str) -> Config:
        toml: dict[str, object] = read_toml(config_path) if config_path else {}
        where = config_path or ""
        if directory:
            path = settings_path(directory, name, NO_POD)
            if os.path.exists(path):
                toml = {**toml, **read_toml(path)}
                where = path
        return load(flags, os.environ if env is None else env, toml, where)

    return config_for
