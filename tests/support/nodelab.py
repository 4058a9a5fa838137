"""A node for the CNI and node-agent tests: a container runtime's view of CNI, and cheap namespace files.

`CniNode` plays the runtime: it runs real CNI plugin binaries (Debian's bridge + host-local, then
interceptd-cni) with the JSON and environment a runtime passes, always inside a "node" network namespace
the test made, so the bridge plugin never touches the host's namespace. `NsDir` is a directory of
namespace files (`unshare --net=FILE`) that the node agent watches, outside /run/netns so no other test's
namespaces are ever managed. Everything is removed on exit, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from support.netlab import VENV_BIN, delete_ns, new_ns, sh, wait_until

CNI_BIN = "/usr/lib/cni"
INTERCEPTD_CNI = str(VENV_BIN / "interceptd-cni")
NODE_IP = "192.0.2.1"  # the bridge's gateway address in the node namespace
NODE_IP6 = "2001:db8::1"  # the same for IPv6 (CniNode(v6=True))


@dataclass
class CniResult:
    rc: int
    out: dict[str, Any] | None
    stderr: str


@dataclass
class CniNode:
    """A node namespace with a bridge network (192.0.2.0/24) and a conflist chaining interceptd-cni."""

    interceptd: dict[str, Any] = field(default_factory=dict)  # the conflist's "interceptd" object
    v6: bool = False  # pods also get an address of 2001:db8::/64 (gateway NODE_IP6)
    node: str = ""
    tmp: str = ""

    def __enter__(self) -> CniNode:
        self.tmp = tempfile.mkdtemp(prefix="icd-cni-")
        try:
            self.node = new_ns("-node")
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.interceptd.setdefault("state_dir", os.path.join(self.tmp, "state"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.node:
            delete_ns(self.node)
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def state_dir(self) -> str:
        return str(self.interceptd["state_dir"])

    def plugins(self, interceptd: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        ranges = [[{"subnet": "192.0.2.0/24", "gateway": NODE_IP}]]
        routes = [{"dst": "0.0.0.0/0"}]
        if self.v6:
            ranges.append([{"subnet": "2001:db8::/64", "gateway": NODE_IP6}])
            routes.append({"dst": "::/0"})
        ipam = {"type": "host-local", "ranges": ranges, "routes": routes, "dataDir": os.path.join(self.tmp, "ipam")}
        return [{"type": "bridge", "bridge": "icdbr0", "isGateway": True, "ipMasq": False, "ipam": ipam},
                {"type": "interceptd-cni", "interceptd": self.interceptd if interceptd is None else interceptd}]

    def exec(self, plugin: dict[str, Any], command: str, netns: str, container: str, args: str = "",
             prev: dict[str, Any] | None = None, stdin: str | None = None, env: dict[str, str] | None = None,
             version: str = "1.0.0") -> CniResult:
        """One plugin invocation, exactly as a runtime makes it (conf on stdin, CNI_* in the environment)."""
        conf = {"cniVersion": version, "name": "icdnet", **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        binary = INTERCEPTD_CNI if plugin["type"] == "interceptd-cni" else os.path.join(CNI_BIN, plugin["type"])
        # Like kubelet, IgnoreUnknown=1 first: the bridge plugin refuses keys it does not know otherwise.
        cni_args = f"IgnoreUnknown=1;{args}" if args else ""
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                    "CNI_CONTAINERID": container, "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_ARGS": cni_args,
                    "CNI_PATH": CNI_BIN, **(env or {})}
        result = sh(binary, ns=self.node, check=False, env=full_env,
                    input=json.dumps(conf) if stdin is None else stdin)
        out = json.loads(result.stdout) if result.stdout.strip() else None
        return CniResult(result.returncode, out, result.stderr)

    def chain(self, command: str, pod: str, container: str, args: str = "",
              cached: dict[str, Any] | None = None) -> list[CniResult]:
        """ADD/CHECK run the plugins in order, DEL in reverse; each sees the previous result (CNI 1.0)."""
        netns = f"/run/netns/{pod}"
        plugins = self.plugins()
        results: list[CniResult] = []
        prev = cached
        for plugin in reversed(plugins) if command == "DEL" else plugins:
            res = self.exec(plugin, command, netns, container, args, prev)
            results.append(res)
            if res.rc != 0:
                break
            if command == "ADD":
                prev = res.out
        return results


def table_listing(ns: str, table: str = "interceptd") -> str | None:
    """`nft list table` inside a /run/netns namespace, or None when there is no such table."""
    res = sh("nft", "-j", "list", "table", "inet", table, ns=ns, check=False)
    return res.stdout if res.returncode == 0 else None


@dataclass
class NsDir:
    """A directory of network namespace files, each with a documentation address (on lo: no module needed)."""

    path: str = ""
    names: list[str] = field(default_factory=list)

    def __enter__(self) -> NsDir:
        self.path = tempfile.mkdtemp(prefix="icd-nsdir-")
        return self

    def add(self, name: str, address: str) -> str:
        """Create namespace `name` with `address` (like 198.51.100.7/32); returns its file."""
        file = os.path.join(self.path, name)
        open(file, "w").close()
        self.names.append(name)
        subprocess.run(["unshare", f"--net={file}", "sh", "-c",
                        f"ip link set lo up && ip addr add {address} dev lo"], check=True, capture_output=True)
        return file

    def remove(self, name: str) -> None:
        file = os.path.join(self.path, name)
        subprocess.run(["umount", file], capture_output=True)
        if os.path.exists(file):
            os.unlink(file)
        if name in self.names:
            self.names.remove(name)

    def bind(self, name: str, netns_file: str) -> str:
        """Show an existing namespace (e.g. a netlab pod) in this directory too, under `name`."""
        file = os.path.join(self.path, name)
        open(file, "w").close()
        self.names.append(name)
        subprocess.run(["mount", "--bind", netns_file, file], check=True, capture_output=True)
        return file

    def run_in(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net={os.path.join(self.path, name)}", *cmd], check=check, text=True,
                              capture_output=True)

    def __exit__(self, *exc: object) -> None:
        for name in list(self.names):
            self.remove(name)
        shutil.rmtree(self.path, ignore_errors=True)


_GET = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as resp:
        print(resp.status); print(resp.read().decode(), end="")
except urllib.error.HTTPError as exc:
    print(exc.code); print(exc.read().decode(), end="")
except OSError as exc:
    print(0); print(exc, end="")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeAgent:
    """`interceptd node` as a subprocess in the host namespace (it only ever enters the namespaces it is given),
    or, with `netns`, inside that test-made namespace as its node (needed for --ambient-host-rules, which
    writes into the agent's own namespace); its HTTP endpoints are then asked from inside that namespace."""

    state_dir: str
    netns_dir: str = ""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    log_path: str = ""
    wrapper: tuple[str, ...] = ()  # a command that runs the agent, e.g. ("prlimit", "--nofile=1024:8192")
    netns: str = ""  # a /run/netns name: the agent's own namespace (its "node")

    def start(self, wait_ready: float = 60.0) -> NodeAgent:
        self.port = self.port or free_port()
        self.log_path = os.path.join(self.state_dir, f"agent-{time.monotonic_ns()}.log")
        os.makedirs(self.state_dir, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "INTERCEPTD_STATE_DIR": self.state_dir,
               "INTERCEPTD_NETNS_DIR": self.netns_dir, "INTERCEPTD_METRICS_ADDRESS": f"127.0.0.1:{self.port}",
               "INTERCEPTD_LOG_FORMAT": "json", "INTERCEPTD_RECONCILE_INTERVAL": "2", **self.env}
        inside = ("ip", "netns", "exec", self.netns) if self.netns else ()
        if self.netns:
            sh("ip", "link", "set", "lo", "up", ns=self.netns)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([*self.wrapper, *inside, str(VENV_BIN / "interceptd"), "node", *self.args],
                                         env=env,
                                         stderr=log,
                                         stdout=subprocess.DEVNULL, text=True)
        if wait_ready and not wait_until(lambda: self.get("/readyz")[0] == 200, wait_ready, 0.1):
            raise AssertionError(f"node agent not ready: {self.get('/readyz')} {self.logs()[-2000:]}")
        return self

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        if self.netns:
            res = sh(sys.executable, "-c", _GET, f"http://127.0.0.1:{self.port}{path}", str(timeout), ns=self.netns,
                     check=False)
            status, _, body = res.stdout.partition("\n")
            return (int(status), body) if status.isdigit() else (0, res.stderr)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """`name{labels}` -> value, from the text exposition."""
        status, text = self.get("/metrics", timeout)
        assert status == 200, text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def logs(self) -> str:
        with open(self.log_path, encoding="utf-8") as fh:
            return fh.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
