"""A directory laid out as the kubelet mounts a ConfigMap, for tests and benchmarks of live pod settings."""

from __future__ import annotations

import os
import shutil


class ConfigMapDir:
    """A directory laid out as the kubelet mounts a ConfigMap: `KEY -> ..data/KEY`, `..data -> ..vN`."""

    def __init__(self, path: str) -> None:
        self.path, self.version = path, 0
        os.makedirs(path)

    def publish(self, files: dict[str, str]) -> None:
        """A new version of every key, made visible at once by renaming the `..data` symlink."""
        self.version += 1
        version = os.path.join(self.path, f"..v{self.version}")
        os.mkdir(version)
        for key, text in files.items():
            with open(os.path.join(version, key), "w", encoding="utf-8") as fh:
                fh.write(text)
        tmp = os.path.join(self.path, "..data_tmp")
        os.symlink(f"..v{self.version}", tmp)
        os.replace(tmp, os.path.join(self.path, "..data"))
        for key in files:
            if not os.path.lexists(os.path.join(self.path, key)):
                os.symlink(os.path.join("..data", key), os.path.join(self.path, key))
        shutil.rmtree(os.path.join(self.path, f"..v{self.version - 1}"), ignore_errors=True)
