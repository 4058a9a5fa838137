"""`interceptd node`: one agent keeps interception in place in every pod network namespace of the node.

Namespaces come from two sources: the CNI plugin's records in the state directory (it applied the pod's
rules itself at ADD and says so over the socket), and a watched directory of namespace files (/run/netns),
each configured by the node's configuration plus an optional drop-in NAME.toml. Each namespace is driven
by the per-namespace logic of `interceptd run` (agent.Agent: apply, check, repair, retry with backoff,
reload); this module replaces only its loop. One thread selects over every namespace's kernel events, the
socket, the directory watch and the signals; a periodic full pass (rescan and check all) is the backstop.

Each namespace's libnftables context and event socket are created inside it (see netns.py), so reading
and repairing a pod needs no setns; the HTTP threads read counters through the same handles.

Restart: a namespace's state file holds the listing taken after its last apply; a namespace whose table
still equals it, and whose configuration renders the same ruleset, is adopted without being touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from interceptd.config import Config, load, read_toml
from interceptd.control.install import Applied
from interceptd.control.state import AgentState
from interceptd.errors import ConfigError, InterceptdError, KernelRefusedError, ListenError, LockedError, NamespaceError
from interceptd.ruleset import drift
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import normalise
from interceptd.runtime import logs, nodestate
from interceptd.runtime.agent import Agent, catch_signals
from interceptd.runtime.lockfile import Lock
from interceptd.runtime.metrics import Collector, MetricsServer
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import host, netns
from interceptd.system.events import NftEvents
from interceptd.system.kernel import NftKernel
from interceptd.system.routes import Netlink

RESCAN_SOON_S = 0.05  # a namespace file not yet bind-mounted (`ip netns add` is two steps)
NODE_WIDE = ("interceptd_build",)  # families exported once, without a netns label
MAX_REQUEST = 65536
FD_SETSIZE = 1024  # libnftables select(2)s on its socket: each context's descriptor must stay below this
FD_HEADROOM = 32  # for the listener, the HTTP threads and the transient netlink sockets of an apply


@dataclass(frozen=True)
class Source:
    """Where a managed namespace came from; a different Source under the same name is a new namespace."""

    name: str
    path: str
    kind: str  # "cni" or "dir"
    ident: netns.Identity


def _facts_in(path: str, config: Config) -> HostFacts:
    with netns.entered(path):
        return host.detect(config)


class Member(Agent):
    """One managed namespace: Agent's apply/check/repair/reload, driven by the node's loop, not Agent.run."""

    def __init__(self, source: Source, config: Config, reload: Callable[[], Config], node: Node) -> None:
        self.source = source
        self.events: NftEvents | None = None
        self._node = node
        if config.own_table:
            raise ConfigError(f"network namespace {source.name}: own_table cannot be used with node (an owned "
                              f"table lives only as long as the libnftables context that made it)")
        super().__init__(config, reload, kernel=NftKernel(netns=source.path, keep_context=False),
                         router=Netlink(netns=source.path),
                         facts=lambda cfg: _facts_in(source.path, cfg), notifier=Notifier(env={}))
        # Agent's own loop never runs here (the node's serves every member): release its descriptors now.
        # That matters: libnftables waits on its socket with select(2), so the descriptor of each context
        # (made per call) must stay below FD_SETSIZE (1024); a member keeps only its events' three.
        Agent.close(self)
        self.log = self.log.bind(netns=source.name)
        self.collector = Collector(self.kernel, self.state)
        self.saved: Applied | None = None  # what the state file holds

    def _set_events(self, enabled: bool) -> None:
        """The namespace's kernel events, opened inside it and read by the node's loop."""
        if enabled and self.events is None:
            try:
                with netns.entered(self.source.path):
                    self.events = NftEvents(self.config.table)
            except (OSError, NamespaceError) as exc:
                self.log.warning("kernel events unavailable; periodic checks only", error=str(exc))
            else:
                self._node.selector.register(self.events, selectors.EVENT_READ, self)
        elif not enabled and self.events is not None:
            self._node.selector.unregister(self.events)
            self.events.close()
            self.events = None
        with self.state.lock:
            self.state.kernel_events = self.events is not None

    def close(self) -> None:
        self._set_events(False)

    def _wake(self) -> None:
        """/readyz saw drift: the node's loop checks (and repairs) this namespace at once."""
        self._node.request_check(self.source.name)

    def adopt(self, record: nodestate.Record | None) -> bool:
        """Take the kernel's table as ours, untouched, if it is exactly what the record says we applied."""
        if record is None or not record.listing or record.ruleset_digest != nodestate.ruleset_digest(self.ruleset):
            return False
        try:
            listing = self.kernel.list_table(self.ruleset.table, self.ruleset.family)
        except KernelRefusedError:
            return False
        if listing is None or drift.compare(record.listing, normalise(listing)):
            return False
        self.applied = self.saved = Applied(self.ruleset, record.listing, 0.0)
        with self.state.lock:
            self.state.ready = True
            self.state.generation = 1
            self.state.last_apply_success_ts = self.state.last_reload_success_ts = time.time()
        return True


def dir_config_loader(flags: dict[str, str], config_path: str | None, drop_in_dir: str,
                      env: dict[str, str] | None = None) -> Callable[[str], Config]:
    """name -> Config of a watched-directory namespace: the node's file, then NAME.toml, then env and flags."""

    def config_for(name: str) -> Config:
        toml: dict[str, object] = read_toml(config_path) if config_path else {}
        drop_in = os.path.join(drop_in_dir, f"{name}.toml")
        where = config_path or ""
        if os.path.exists(drop_in):
            toml = {**toml, **read_toml(drop_in)}
            where = drop_in
        return load(flags, os.environ if env is None else env, toml, where)

    return config_for


class NodeCollector:
    """Every namespace's families (kernel counters and agent state) with a `netns` label, merged by name."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        members = self.node.snapshot()
        for member in members:
            for family in member.collector.collect():
                if family.name in NODE_WIDE:
                    merged.setdefault(family.name, family)
                    continue
                family.samples = [s._replace(labels={"netns": member.source.name, **s.labels})
                                  for s in family.samples]
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()
        count = GaugeMetricFamily("interceptd_node_namespaces", "Network namespaces the node agent keeps, by source "
                                  "(cni: registered by interceptd-cni, dir: the watched directory).",
                                  labels=["source"])
        for kind in nodestate.SOURCES:
            count.add_metric([kind], sum(1 for m in members if m.source.kind == kind))
        yield count
        yield GaugeMetricFamily("interceptd_node_ready", "1 when every known namespace holds its ruleset "
                                "(what /readyz reports), else 0.", value=int(self.node.ready()))


class Node:
    def __init__(self, config: Config, dir_config: Callable[[str], Config], notifier: Notifier | None = None,
                 ) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self._dir_config = dir_config
        self.notifier = notifier or Notifier()
        self.log = logs.get(component="node")
        self.members: dict[str, Member] = {}
        self._lock = threading.Lock()  # guards `members` and `_due`: the loop writes, HTTP threads read
        self._failed: dict[str, str] = {}  # name -> last error, so a broken namespace is logged once
        self._due: set[str] = set()
        self._scanned = False
        self.state = AgentState("*", "node")  # for /readyz: its probe asks every namespace
        self.state.probe = self.ready
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listener: socket.socket | None = None
        self._watch: netns.DirWatch | None = None
        self._stop_requested = False
        self._reload_requested = False

    # --- what other threads call ---

    def snapshot(self) -> list[Member]:
        with self._lock:
            return list(self.members.values())

    def ready(self) -> bool:
        """Every known namespace holds its ruleset (as of its last check or apply)."""
        bad = []
        for member in self.snapshot():
            with member.state.lock:
                if not member.state.ready or member.retry_at is not None:
                    bad.append(member.source.name)
        ready = self._scanned and not bad
        with self.state.lock:
            self.state.ready = ready
            self.state.last_error = ("" if ready else "starting" if not self._scanned else
                                     f"{len(bad)} namespaces do not hold their ruleset: {', '.join(sorted(bad)[:10])}")
        return ready

    def request_check(self, name: str) -> None:
        with self._lock:
            self._due.add(name)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    # --- discovering namespaces ---

    def discover(self) -> tuple[dict[str, tuple[Source, nodestate.Record | None]], bool]:
        """What should be managed now, and whether a namespace file was seen half-created."""
        records = {name: nodestate.read(self.state_dir, name) for name in nodestate.names(self.state_dir)}
        found: dict[str, tuple[Source, nodestate.Record | None]] = {}
        for name, record in records.items():
            if record is not None and record.source == "cni":
                ident = netns.identity(record.path)
                if ident is None:  # the pod is gone and nobody said DEL (e.g. while the node rebooted)
                    nodestate.remove(self.state_dir, name)
                    continue
                found[name] = (Source(name, record.path, "cni", ident), record)
        pending = False
        if self.config.netns_dir:
            cni_idents = {source.ident for source, _ in found.values()}
            try:
                entries = sorted(os.listdir(self.config.netns_dir))
            except FileNotFoundError:
                entries = []
            for entry in entries:
                path = os.path.join(self.config.netns_dir, entry)
                ident = netns.identity(path)
                if ident is None:
                    pending = pending or os.path.isfile(path)
                    continue
                if entry in found or ident in cni_idents:
                    continue  # the CNI's registration (with the pod's own settings) wins
                try:
                    name = netns.name_for(path)
                except NamespaceError as exc:
                    self._note_failure(entry, str(exc))
                    continue
                record = records.get(name)
                found[name] = (Source(name, path, "dir", ident), record if record and record.source == "dir" else None)
        for name, record in records.items():
            if record is not None and record.source == "dir" and name not in found:
                nodestate.remove(self.state_dir, name)  # its namespace went while the agent was away
        return found, pending

    def scan(self) -> bool:
        """Forget what went, take on what came; True if a half-created namespace file needs another look."""
        found, pending = self.discover()
        for name, member in list(self.members.items()):
            want = found.get(name)
            if want is None or want[0] != member.source:
                self.forget(member, "gone" if want is None else "replaced", remove_record=want is None)
        for name, (source, record) in found.items():
            if name not in self.members:
                self.manage(source, record)
        return pending

    def manage(self, source: Source, record: nodestate.Record | None) -> Member | None:
        started = time.monotonic()
        if _lowest_free_fd() >= FD_SETSIZE - FD_HEADROOM:
            self._note_failure(source.name, f"too many namespaces ({len(self.members)}): libnftables needs a "
                                            f"descriptor below {FD_SETSIZE}, and each namespace holds three")
            return None
        try:
            if source.kind == "cni" and record is not None:
                config = record.config()
                member = Member(source, config, lambda: config, self)
            else:
                member = Member(source, self._dir_config(source.name), lambda: self._dir_config(source.name), self)
        except InterceptdError as exc:
            self._note_failure(source.name, str(exc))
            return None
        self._failed.pop(source.name, None)
        member._set_events(member.config.kernel_events)  # before any apply: no change goes unseen
        adopted = member.adopt(record)
        if not adopted:
            member.apply_desired("start")
        self._save(member, record)
        with self._lock:
            self.members[source.name] = member
        member.log.info("manage", source=source.kind, path=source.path, adopted=adopted,
                        duration_ms=round((time.monotonic() - started) * 1000, 3))
        return member

    def forget(self, member: Member, why: str, remove_record: bool) -> None:
        """Stop managing a namespace; its rules are left as they are (the namespace usually went with them)."""
        with self._lock:
            if self.members.get(member.source.name) is member:
                del self.members[member.source.name]
            self._due.discard(member.source.name)
        member.close()
        if remove_record:
            nodestate.remove(self.state_dir, member.source.name)
        member.log.info("forget", why=why)

    def _note_failure(self, name: str, error: str) -> None:
        if self._failed.get(name) != error:
            self._failed[name] = error
            self.log.warning("cannot manage namespace", netns=name, error=error)

    def _save(self, member: Member, record: nodestate.Record | None = None) -> None:
        """Rewrite the state file when the reference changed (after an apply), so a restart can adopt."""
        applied = member.applied
        if applied is None or applied is member.saved:
            return
        old = record if record is not None else nodestate.read(self.state_dir, member.source.name)
        settings = old.settings if old is not None and member.source.kind == "cni" else {}
        nodestate.write(self.state_dir, nodestate.Record(
            member.source.name, member.source.path, member.source.kind, settings,
            nodestate.ruleset_digest(applied.ruleset), applied.listing, old.container_id if old else ""))
        member.saved = applied

    def _still_there(self, member: Member) -> bool:
        if netns.identity(member.source.path) != member.source.ident:
            return False
        return member.source.kind != "cni" or nodestate.exists(self.state_dir, member.source.name)

    def check(self, member: Member, trigger: str) -> None:
        """A namespace that went is forgotten, never repaired (DEL removes the table on purpose)."""
        if not self._still_there(member):
            self.forget(member, "gone", remove_record=True)
            return
        member.check(trigger)
        self._save(member)

    def check_all(self, trigger: str = "timer") -> float:
        """The backstop: one full reconcile pass over every namespace; returns its duration in seconds."""
        started = time.monotonic()
        for member in list(self.members.values()):
            self.check(member, trigger)
        return time.monotonic() - started

    def reload_all(self) -> None:
        """SIGHUP: the watched directory's namespaces re-read the node's file and their drop-ins."""
        for member in list(self.members.values()):
            if member.source.kind == "dir":
                member.reload()
                self._save(member)

    # --- the socket: registrations from interceptd-cni, status queries ---

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op, name = message.get("op"), str(message.get("name", ""))
        member = self.members.get(name)
        if op == "add":
            record = nodestate.read(self.state_dir, name)
            ident = netns.identity(record.path) if record is not None and record.source == "cni" else None
            if record is None or ident is None:
                return {"ok": False, "error": f"network namespace {name}: no usable CNI record"}
            if member is not None:
                self.forget(member, "registered again", remove_record=False)
            added = self.manage(Source(name, record.path, "cni", ident), record)
            if added is None:
                return {"ok": False, "error": self._failed.get(name, "cannot manage")}
            return {"ok": True, "ready": added.state.ready}
        if op == "del":
            if member is not None and member.source.kind == "cni":
                self.forget(member, "unregistered", remove_record=False)
            return {"ok": True}
        if op == "status":
            if member is None:
                return {"ok": False, "error": f"network namespace {name} is not managed by the node agent"}
            with member.state.lock:
                s = member.state
                return {"ok": True, "source": member.source.kind, "path": member.source.path, "ready": s.ready,
                        "generation": s.generation, "repairs": sum(s.drift_repairs.values()),
                        "last_error": s.last_error}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _serve_one(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        with conn:
            try:
                conn.settimeout(2.0)
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                message = json.loads(data)
                reply = self.handle(message) if isinstance(message, dict) else {"ok": False, "error": "not an object"}
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except (OSError, ValueError) as exc:
                self.log.warning("bad request on the node socket", error=str(exc))

    # --- lifecycle ---

    def run(self) -> int:
        lock = Lock(self.state_dir, "node")
        try:
            lock.acquire()
        except LockedError as exc:
            raise LockedError(f"another interceptd node agent runs with --state-dir {self.state_dir!r}: {exc}") \
                from None
        metrics = None
        try:
            _raise_fd_limit()
            if self.config.metrics_address:
                reg = CollectorRegistry(auto_describe=False)
                reg.register(NodeCollector(self))
                ProcessCollector(registry=reg)
                metrics = MetricsServer(self.config.metrics_address, reg, self.state).start()
            self._open_socket()
            if self.config.netns_dir:
                os.makedirs(self.config.netns_dir, exist_ok=True)
                self._watch = netns.DirWatch(self.config.netns_dir)
                self.selector.register(self._watch, selectors.EVENT_READ, "watch")
            restore_signals = catch_signals(self._wake_w, self._on_signal)
            try:
                started = time.monotonic()
                rescan_at = time.monotonic() + RESCAN_SOON_S if self.scan() else None
                self._scanned = True
                self.log.info("start", namespaces=len(self.members), duration_ms=round(
                    (time.monotonic() - started) * 1000, 3))
                self.notifier.ready(self.status_line())
                self._loop(rescan_at)
            finally:
                self.notifier.stopping()
                restore_signals()
        finally:
            self._close()
            if metrics is not None:
                metrics.stop()
            lock.release()
        return 0

    def _open_socket(self) -> None:
        path = nodestate.socket_path(self.state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous agent's; the lock says none is running
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            umask = os.umask(0o177)  # the socket is born 0600: no moment where others may connect
            try:
                listener.bind(path)
            finally:
                os.umask(umask)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise ListenError(f"--state-dir {self.state_dir!r}: cannot listen on {path!r}: {exc.strerror}") from None
        self._listener = listener
        self.selector.register(listener, selectors.EVENT_READ, "socket")

    def _loop(self, rescan_at: float | None) -> None:
        interval = self.config.reconcile_interval
        next_pass = time.monotonic() + interval
        watchdog = self.notifier.watchdog_s
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if watchdog is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + watchdog / 2
            retries = [m.retry_at for m in self.members.values() if m.retry_at is not None]
            deadlines = [next_pass, rescan_at, min(retries, default=None), next_ping if watchdog else None]
            timeout = max(0.0, min(d for d in deadlines if d is not None) - now)
            changed: set[str] = set()
            for key, _ in self.selector.select(timeout):
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 4096):
                            pass
                elif key.data == "socket":
                    self._serve_one()
                elif key.data == "watch":
                    assert self._watch is not None
                    self._watch.drain()
                    rescan_at = time.monotonic()
                elif isinstance(key.data, Member) and key.data.events is not None and key.data.events.read():
                    changed.add(key.data.source.name)
            if self._stop_requested:
                return
            if self._reload_requested:
                self._reload_requested = False
                self.reload_all()
            with self._lock:
                changed |= self._due
                self._due.clear()
            for name in sorted(changed):
                member = self.members.get(name)
                if member is not None and member.retry_at is None:
                    self.check(member, "event")
            now = time.monotonic()
            if rescan_at is not None and now >= rescan_at:
                rescan_at = now + RESCAN_SOON_S if self.scan() else None
            for member in [m for m in self.members.values() if m.retry_at is not None and now >= m.retry_at]:
                if self._still_there(member):
                    member.apply_desired("retry")
                    self._save(member)
                else:
                    self.forget(member, "gone", remove_record=True)
            if now >= next_pass:
                if self.scan():
                    rescan_at = now + RESCAN_SOON_S
                scanned = time.monotonic()
                checked = self.check_all("timer")
                self.log.debug("pass", namespaces=len(self.members), scan_ms=round((scanned - now) * 1000, 3),
                               check_ms=round(checked * 1000, 3))
                self.notifier.status(self.status_line())
                next_pass = time.monotonic() + interval

    def status_line(self) -> str:
        members = self.snapshot()
        ready = sum(1 for m in members if m.state.ready)
        return f"node: {len(members)} namespaces, {ready} ready"

    def _close(self) -> None:
        """Release everything; every namespace keeps its rules (fail closed)."""
        for member in list(self.members.values()):
            member.close()
        with self._lock:
            self.members.clear()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(nodestate.socket_path(self.state_dir))
        if self._watch is not None:
            self._watch.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.log.info("stop")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True


def _lowest_free_fd() -> int:
    """The descriptor the next libnftables context would get."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


def _raise_fd_limit() -> None:
    """A few descriptors per namespace (libnftables, events, the per-namespace agent): use what we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def locate(config: Config, name: str) -> tuple[str, str]:
    """`status --netns NAME`: the namespace's file and table, from its state file or the watched directory."""
    record = nodestate.read(config.state_dir, name)
    if record is not None:
        path = record.path
        table = record.config().table if record.source == "cni" else config.table
    else:
        path = name if os.sep in name else os.path.join(config.netns_dir or "/run/netns", name)
        table = config.table
    if netns.identity(path) is None:
        raise NamespaceError(f"--netns {name!r}: {path!r} is not a network namespace")
    return path, table


def agent_view(config: Config, name: str) -> str:
    """One line on what the node agent thinks of the namespace, or why it cannot say."""
    try:
        reply = nodestate.request(config.state_dir, {"op": "status", "name": netns.name_for(name)}, timeout=2.0)
    except (OSError, ValueError) as exc:
        return f"node agent: not reachable ({exc})"
    if not reply.get("ok"):
        return f"node agent: {reply.get('error')}"
    health = "matches" if reply["ready"] else f"NOT READY: {reply['last_error']}"
    return (f"node agent: {reply['source']} namespace {reply['path']}, generation {reply['generation']}, "
            f"{health}, {reply['repairs']} repairs")
