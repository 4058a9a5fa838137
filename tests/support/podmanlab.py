"""A real container runtime for the tests: Debian's podman (CNI network backend) inside a private node.

The node is a network namespace the test made plus one mount namespace, held open by a sleeping process
(`ip netns exec NODE unshare -m ... sleep`). Every podman command and the node agent enter both with
`nsenter -t HOLDER -m -n`, so they share one view of what podman mounts, and the host sees none of it:

- /run is a fresh tmpfs in there: podman's namespace files (/run/netns/netns-...), crun's state (/run/crun)
  and anything else a runtime keeps in /run stay in the node. The CNI_NETNS paths podman passes therefore
  resolve only inside the node, which is why the node agent runs there too (in the same network namespace,
  where its metrics listen on 127.0.0.1).
- /dev/shm is a fresh tmpfs too: podman's lock memory (/dev/shm/libpod_lock) is the node's own.
- /var/lib is an overlay whose upper layer is in the temp dir: libcni's result cache (/var/lib/cni) is
  written there, not on the host.
- /sys/fs/cgroup is a cgroup2 mount; containers run with --cgroups=disabled and --cgroup-manager=cgroupfs.
- Storage, run and tmp directories are --root, --runroot and --tmpdir in the temp dir (vfs storage, no
  image: `--rootfs` on busybox-static with its applet links, which has sh, sleep and nc), and
  CONTAINERS_CONF selects the CNI backend, the plugin directories (Debian's /usr/lib/cni and the venv's bin,
  where interceptd-cni is) and the conflist directory. Nothing reads or writes the host's podman state.
- The conflist is the shipped config/cni/87-interceptd.conflist with only the subnet and the paths
  substituted. Its plugins run inside the node network namespace: the bridge, its gateway address, its
  ipMasq rules and portmap's rules exist only there.

The test process reaches a container's network namespace as /proc/PID/ns/net (PID from `podman inspect`),
which needs no mount. Teardown, also on failure: `podman rm -f --all`, then any container process or conmon
still alive is killed by pid (conmon double-forks away from the holder, so ending the holder alone would
leave it), then the holder ends (the mount namespace and its mounts go with its last process), the node
namespace and the temp dir are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

from support.netlab import ROOT, VENV_BIN, call_in, delete_ns, new_ns
from support.nodelab import CNI_BIN, NodeAgent

CONFLIST = ROOT / "config" / "cni" / "87-interceptd.conflist"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
SUBNET, GATEWAY = "203.0.113.0/24", "203.0.113.1"  # the pods' network; the gateway is the node's bridge
RUN_FLAGS = ("--cgroups=disabled", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1024:1024")


def missing() -> str:
    """Why podman cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root"
    for path, package in (("/usr/bin/podman", "podman"), (BUSYBOX, "busybox-static"),
                          (os.path.join(CNI_BIN, "bridge"), "containernetworking-plugins")):
        if not os.path.exists(path):
            return f"{package} is not installed (make deps)"
    return ""


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    pid: int
    ip: str
    sandbox: str  # the name of the namespace file podman made (/run/netns/NAME inside the node)

    @property
    def netns(self) -> str:
        """Its network namespace, as the test process (outside the node's mount namespace) can open it."""
        return f"/proc/{self.pid}/ns/net"


@dataclass
class PodmanNode:
    """A node namespace running podman on the shipped conflist; see the module docstring for the arrangement."""

    tmp: str = ""
    node: str = ""
    holder: subprocess.Popen[str] | None = None
    network: str = ""
    started: list[tuple[int, int]] = field(default_factory=list)  # (container pid, conmon pid) of each run

    def __enter__(self) -> PodmanNode:
        self.tmp = tempfile.mkdtemp(prefix="icd-podman-")
        try:
            self._write_files()
            self.node = new_ns("-node")
            self._hold_mounts()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)

    @property
    def state_dir(self) -> str:
        return self._path("state")

    @property
    def rootfs(self) -> str:
        return self._path("rootfs")

    def _write_files(self) -> None:
        for sub in ("net.d", "ipam", "state", "varlib-upper", "varlib-work", "rootfs/bin", "rootfs/etc",
                    "rootfs/proc", "rootfs/sys", "rootfs/dev", "rootfs/tmp"):
            os.makedirs(self._path(sub))
        shutil.copy2(BUSYBOX, self._path("rootfs", "bin", "busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], check=True, text=True, capture_output=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                os.symlink("busybox", self._path("rootfs", "bin", applet))
        conf = json.loads(CONFLIST.read_text())
        self.network = conf["name"]
        bridge, plugin = conf["plugins"][0], conf["plugins"][-1]
        bridge["ipam"]["ranges"] = [[{"subnet": SUBNET, "gateway": GATEWAY}]]
        bridge["ipam"]["dataDir"] = self._path("ipam")
        plugin["interceptd"]["state_dir"] = self.state_dir
        with open(self._path("net.d", CONFLIST.name), "w", encoding="utf-8") as fh:
            json.dump(conf, fh)
        with open(self._path("containers.conf"), "w", encoding="utf-8") as fh:
            fh.write(f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{CNI_BIN}", "{VENV_BIN}"]\n'
                     f'network_config_dir = "{self._path("net.d")}"\n'
                     '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')
        with open(self._path("storage.conf"), "w", encoding="utf-8") as fh:
            fh.write(f'[storage]\ndriver = "vfs"\ngraphroot = "{self._path("storage")}"\n'
                     f'runroot = "{self._path("run")}"\n')

    def _hold_mounts(self) -> None:
        script = ("mount -t tmpfs -o mode=0755 tmpfs /run && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                  "mount -t cgroup2 none /sys/fs/cgroup && "
                  f"mount -t overlay overlay -o lowerdir=/var/lib,upperdir={self._path('varlib-upper')},"
                  f"workdir={self._path('varlib-work')} /var/lib && echo ready && exec sleep infinity")
        # `ip netns exec` and `unshare` (without --fork) exec in place: the holder's pid is the sleep's.
        self.holder = subprocess.Popen(["ip", "netns", "exec", self.node, "unshare", "-m", "--propagation",
                                        "private", "sh", "-c", script], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None and self.holder.stderr is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait()
            raise RuntimeError(f"node mount namespace: {self.holder.stderr.read().strip()}")

    def enter(self) -> tuple[str, ...]:
        """The command prefix that runs a program in the node (its network and mount namespaces)."""
        assert self.holder is not None
        return ("nsenter", "-t", str(self.holder.pid), "-m", "-n", "--")

    def podman(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp,
                    "CONTAINERS_CONF": self._path("containers.conf"),
                    "CONTAINERS_STORAGE_CONF": self._path("storage.conf"), **(env or {})}
        cmd = [*self.enter(), "podman", "--root", self._path("storage"), "--runroot", self._path("run"),
               "--tmpdir", self._path("tmp"), "--cgroup-manager=cgroupfs", *args]
        result = subprocess.run(cmd, env=full_env, text=True, capture_output=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def run(self, name: str, *command: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = (),
            ) -> Container:
        """`podman run -d [flags]` on the rootfs (default command: sleep); `env` is podman's own environment
        (where podman takes extra CNI_ARGS from), not the container's."""
        self.podman("run", "-d", "--name", name, *flags, *self._on_network(), *(command or ("sleep", "600")),
                    env=env)
        return self.container(name)

    def run_rm(self, *command: str) -> str:
        """`podman run --rm` in the foreground: the command's output, once the container is gone again."""
        return self.podman("run", "--rm", *self._on_network(), *command).stdout

    def _on_network(self) -> tuple[str, ...]:
        return ("--network", self.network, *RUN_FLAGS, "--rootfs", self.rootfs)

    def container(self, name: str) -> Container:
        """A running container as `podman inspect` shows it now (its pid changes with every start)."""
        found: list[dict[str, Any]] = json.loads(self.podman("inspect", name).stdout)
        state = found[0]
        self.started.append((state["State"]["Pid"], state["State"]["ConmonPid"]))
        return Container(name, state["Id"], state["State"]["Pid"],
                         state["NetworkSettings"]["Networks"][self.network]["IPAddress"],
                         os.path.basename(state["NetworkSettings"]["SandboxKey"]))

    def exec(self, container: Container, script: str) -> str:
        """A shell command inside the container (its own processes, its own network namespace); its stdout."""
        return self.podman("exec", container.name, "sh", "-c", script).stdout.strip()

    def agent(self, **kw: Any) -> NodeAgentInNode:
        """The node agent as a DaemonSet runs it: only the pods the CNI plugin registers, in the node."""
        return NodeAgentInNode(self.state_dir, "", wrapper=self.enter(), node_netns=self.node, **kw)

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is still one of this node's containers or conmons (and not a reused pid)."""
        try:
            if os.readlink(f"/proc/{pid}/root") == self.rootfs:
                return True
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return self.tmp.encode() in fh.read()
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.holder is not None and self.holder.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.podman("rm", "-f", "-t", "0", "--all", check=False)
        for pids in self.started:
            for pid in pids:
                if pid and self._ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            for stream in (self.holder.stdout, self.holder.stderr):
                if stream is not None:
                    stream.close()
            self.holder = None
        if self.node:
            delete_ns(self.node)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class NodeAgentInNode(NodeAgent):
    """`interceptd node` run inside a node's namespaces (wrapper = PodmanNode.enter()); its HTTP endpoints
    listen on the node's loopback, so the test asks them from a child inside the node's network namespace."""

    # Not NodeAgent.netns: that one is entered with `ip netns exec`, which the wrapper has done already (and
    # the node's private /run has no /run/netns of the host's).
    node_netns: str = ""

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        result: tuple[int, str] = call_in(self.node_netns, NodeAgent.get, self, path, timeout)
        return result
