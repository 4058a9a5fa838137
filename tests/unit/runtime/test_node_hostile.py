"""What the node agent refuses to trust in its watched directory and on its socket (over fake kernels: even
if a check failed, nothing could be installed anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.nodefakes import NoClaim

from interceptd.config import options as config
from interceptd.errors import ConfigError
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime.discovery import check_netns_dir
from interceptd.runtime.node import Node, Ports
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import netns
from interceptd.system.fake import FakeKernel, FakeRouter

BASE = {"service_cidr": "*", "inbound_ports": "*"}
root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Node, Path, dict[str, FakeKernel]]]:
    directory = tmp_path / "netns"
    directory.mkdir(mode=0o755)
    kernels: dict[str, FakeKernel] = {}
    ports = Ports(kernel=lambda path: kernels.setdefault(path, FakeKernel()), router=lambda _p: FakeRouter(),
                  facts=lambda _p, _c: HostFacts(ipv6=False, host_ip=None),
                  events=lambda _p, _t: (_ for _ in ()).throw(OSError("no events")),
                  claim=lambda _p, _t: NoClaim())
    cfg = config.load({**BASE, "netns_dir": str(directory), "state_dir": str(tmp_path / "state")}, {})
    node = Node(cfg, lambda _name: config.load(BASE, {}), notifier=Notifier({}), ports=ports)
    yield node, directory, kernels
    node.loop.close()
    for entry in directory.iterdir():
        if os.path.ismount(entry):
            subprocess.run(["umount", str(entry)], check=False)


def bind(source: str, target: Path) -> None:
    target.touch()
    subprocess.run(["mount", "--bind", source, str(target)], check=True)


def test_a_symlink_to_the_agents_own_namespace_is_never_followed(watched: tuple[Node, Path, dict[str, FakeKernel]],
                                                                 ) -> None:
    node, directory, kernels = watched
    (directory / "sneaky").symlink_to("/proc/self/ns/net")
    node.scan()
    assert node.members == {} and kernels == {}
    assert "is a symlink" in node.failures()["sneaky"]


@root
def test_a_bind_mount_of_the_agents_own_namespace_is_refused(watched: tuple[Node, Path, dict[str, FakeKernel]],
                                                             ) -> None:
    node, directory, kernels = watched
    bind("/proc/thread-self/ns/net", directory / "host")
    assert netns.identity(str(directory / "host")) is not None
    node.scan()
    assert node.members == {} and kernels == {}
    assert "own network namespace" in node.failures()["host"]


@root
def test_a_namespace_of_another_kind_is_not_a_pod(watched: tuple[Node, Path, dict[str, FakeKernel]]) -> None:
    node, directory, kernels = watched
    bind("/proc/self/ns/uts", directory / "uts")
    assert netns.identity(str(directory / "uts")) is None
    assert not node.scan()  # not "half-created": no rescan every 50 ms
    assert node.members == {} and kernels == {} and "another kind" in node.failures()["uts"]


def test_a_foreign_writable_directory_is_refused_not_fixed(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(ConfigError, match=r"--netns-dir .*writable by root only.*mode 0777"):
        check_netns_dir(str(directory))
    assert directory.stat().st_mode & 0o777 == 0o777
    directory.chmod(0o755)
    check_netns_dir(str(directory))


@pytest.mark.parametrize(("line", "error"), [
    (b"[" * 4000, "not a JSON object"),
    (json.dumps({"op": "add", "name": "../../x"}).encode(), "is not a network namespace name"),
    (json.dumps({"op": "add", "name": "pod", "extra": {"nested": []}}).encode(), "flat JSON object of strings"),
    (json.dumps(["op", "add"]).encode(), "flat JSON object of strings"),
])
def test_socket_requests_are_flat_and_name_only_namespaces(watched: tuple[Node, Path, dict[str, FakeKernel]],
                                                           line: bytes, error: str) -> None:
    node, _directory, kernels = watched
    reply = node.socket.answer(line)
    assert reply["ok"] is False and error in reply["error"] and kernels == {}


def test_records_in_a_directory_others_can_write_are_not_trusted(
        watched: tuple[Node, Path, dict[str, FakeKernel]], tmp_path: Path) -> None:
    node, _directory, kernels = watched
    records = tmp_path / "state" / "netns"
    records.mkdir(parents=True)
    (records / "planted.json").write_text(json.dumps({"name": "planted", "path": "/proc/1/ns/net", "source": "cni",
                                                      "settings": {}}))
    records.chmod(0o777)
    node.scan()
    assert node.members == {} and kernels == {}
    assert "lets other users write to it" in node.failures()["state-directory"]
