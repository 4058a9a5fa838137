"""`interceptd node`: keep interception in place in every pod network namespace of the node.

node = loop + discovery + CNI socket + {namespace: table controller}. Namespaces come from two sources: the
CNI plugin's records in the state directory (it applied the pod's rules itself at ADD and says so over the
socket), and a watched directory of namespace files (--netns-dir), each configured by the node's configuration
plus an optional drop-in NAME.toml. Each namespace has its own control.controller.TableController (apply,
check, repair, retry with backoff, reload); this module decides when each one runs, from one event loop
(runtime.loop) that selects over every namespace's kernel events, the socket, the directory watch and the
signals. A periodic full pass (rescan and check all) is the backstop.

Isolation: whatever happens in one namespace (its transaction refused, its routes refused, the namespace
deleted mid-pass, its table owned by someone else, descriptors run out) is that namespace's failure: it is
not ready, retried with backoff, and shown in the log, the metrics and /readyz; every other namespace keeps
its repairs. A namespace that cannot even be managed (a bad drop-in, no address yet) is reported the same way.

Scale: each namespace keeps only its kernel-event sockets, moved above FD_SETSIZE (system.fds); its
libnftables context is made per call, inside the namespace, and so always gets a low descriptor.

Restart: a namespace's state file holds the listing taken after its last apply; a namespace whose table
still equals it, and whose configuration renders the same ruleset, is adopted without being touched.

Live settings: a pod's file in the configuration directory (runtime.podsettings) is watched; a change reloads
that pod alone, in one transaction that rewrites only what differs (control.install), and a file that does
not parse is refused with one log line, the pod keeping its rules. Readiness ("every known pod verified")
is published as /readyz, a metric and a file in the state directory (runtime.readiness).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from interceptd.config import Config
from interceptd.control.controller import TableController
from interceptd.control.install import Applied
from interceptd.control.state import AgentState
from interceptd.errors import ConfigError, InterceptdError, LockedError, NamespaceError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.names import HOST_TABLE
from interceptd.ruleset.nftjson import Json
from interceptd.runtime import discovery, logs, nodestate, podsettings
from interceptd.runtime.discovery import Source
from interceptd.runtime.hostprobe import HOST_NAME, OWN_NETNS, HostProbe
from interceptd.runtime.kevents import EventSource, TableEvents
from interceptd.runtime.lockfile import Lock, TableClaim
from interceptd.runtime.loop import EventLoop, trim_heap
from interceptd.runtime.metrics import Collector, MetricsServer
from interceptd.runtime.nodesocket import NodeSocket
from interceptd.runtime.podsettings import NO_POD, Pod, PodFiles
from interceptd.runtime.readiness import ReadyFile
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import host, netns
from interceptd.system.events import NftEvents
from interceptd.system.fds import raise_nofile_limit
from interceptd.system.kernel import Kernel, NftKernel
from interceptd.system.routes import Netlink, Router

RESCAN_SOON_S = 0.05  # a namespace file not yet bind-mounted (`ip netns add` is two steps)
NODE_WIDE = ("interceptd_build",)  # families exported once, without a netns label
MAX_DETAIL = 10  # namespaces named in /readyz and in the status line


def _facts_in(path: str, config: Config) -> HostFacts:
    with netns.entered(path):
        return host.detect(config)


def _addresses_in(path: str) -> list[str]:
    with netns.entered(path):
        return host.pod_addresses()


def _events_in(path: str, table: str) -> NftEvents:
    with netns.entered(path):
        return NftEvents(table)


class Claim(Protocol):
    """runtime.lockfile.TableClaim: marks the table as kept in its namespace, so that no second interceptd
    (a sidecar agent in the pod, another node agent) fights this one over it."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...


def _claim_in(path: str, table: str) -> Claim:
    return TableClaim(table, netns_path=path)


@dataclass(frozen=True)
class Ports:
    """How the node reaches a namespace (its path): the real adapters, or fakes in unit tests."""

    kernel: Callable[[str], Kernel] = lambda path: NftKernel(netns=path, keep_context=False)
    router: Callable[[str], Router] = lambda path: Netlink(netns=path)
    facts: Callable[[str, Config], HostFacts] = _facts_in
    events: Callable[[str, str], EventSource] = _events_in
    identity: Callable[[str], netns.Identity | None] = netns.identity
    claim: Callable[[str, str], Claim] = _claim_in
    addresses: Callable[[str], Iterable[str]] = _addresses_in  # read only: a watched-directory pod's addresses


class SharedListing(list[Json]):
    """A reference listing that several namespaces hold (a list subclass, so it can be weakly referenced)."""


class Interner:
    """One copy of each distinct ruleset and reference listing for all of the node's namespaces.

    Pods mostly share one configuration, and each copy of a seed ruleset and its listing is some 60 KiB of
    Python objects: at 1,000 pods that is most of the agent's memory. Entries go when no namespace holds them.
    """

    def __init__(self) -> None:
        self._rulesets: weakref.WeakValueDictionary[str, Ruleset] = weakref.WeakValueDictionary()
        self._listings: weakref.WeakValueDictionary[str, SharedListing] = weakref.WeakValueDictionary()
        self._digests: weakref.WeakKeyDictionary[Ruleset, str] = weakref.WeakKeyDictionary()

    def digest(self, ruleset: Ruleset) -> str:
        """nodestate.ruleset_digest, computed once per ruleset object."""
        found = self._digests.get(ruleset)
        if found is None:
            found = self._digests[ruleset] = nodestate.ruleset_digest(ruleset)
        return found

    def __call__(self, applied: Applied) -> Applied:
        key = self.digest(applied.ruleset)
        ruleset = self._rulesets.setdefault(key, applied.ruleset)
        listing = self._listings.get(key)
        if listing is None or listing != applied.listing:  # the same ruleset nearly always lists the same
            listing = SharedListing(applied.listing)
            self._listings[key] = listing
        self._digests.setdefault(ruleset, key)
        return Applied(ruleset, listing, applied.duration_s)


@dataclass(eq=False)
class Member:
    """One managed namespace: where it came from, its controller, its kernel events."""

    source: Source
    controller: TableController
    collector: Collector
    events: TableEvents
    claim: Claim | None = None
    saved: Applied | None = None  # what the state file holds
    pod: Pod = NO_POD  # its Kubernetes namespace and name, as the CNI plugin recorded them
    addresses: tuple[str, ...] = ()  # as the CNI plugin recorded them (IPAM's result)

    @property
    def name(self) -> str:
        return self.source.name

    def labels(self) -> dict[str, str]:
        """The labels of its metric series: bounded, never an address or a port."""
        known = {"k8s_namespace": self.pod[0], "pod": self.pod[1]} if all(self.pod) else {}
        return {"netns": self.name, **known}


class NodeCollector:
    """Every namespace's families (kernel counters and controller state) with a `netns` label, merged by name."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        members = self.node.snapshot()
        host = self.node.host
        sources = [(m.labels(), m.collector) for m in members]
        sources += [({"netns": HOST_NAME}, host.collector)] if host is not None else []
        for labels, collector in sources:
            for family in collector.collect():
                if family.name in NODE_WIDE:
                    merged.setdefault(family.name, family)
                    continue
                family.samples = [s._replace(labels={**labels, **s.labels}) for s in family.samples]
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
        failed = GaugeMetricFamily("interceptd_node_namespace_unmanaged", "1 for each namespace the node agent "
                                   "found but cannot manage (see its log line and /readyz for why).",
                                   labels=["netns"])
        for name in sorted(self.node.failures()):
            failed.add_metric([name], 1)
        yield failed
        ready = self.node.ready()
        yield GaugeMetricFamily("interceptd_node_ready", "1 when every known namespace holds its ruleset "
                                "(what /readyz reports), else 0.", value=int(ready))
        yield GaugeMetricFamily("interceptd_node_pods_verified", "1 when every known pod holds its verified "
                                "ruleset (the readiness file is there), else 0.", value=int(ready))
        pods = GaugeMetricFamily("interceptd_node_pods", "Pods the node agent knows, by state (verified: holds "
                                 "its ruleset as applied; unverified: not, a repair or retry pending; unmanaged).",
                                 labels=["state"])
        verified = sum(1 for m in members if m.controller.ready())
        pods.add_metric(["verified"], verified)
        pods.add_metric(["unverified"], len(members) - verified)
        pods.add_metric(["unmanaged"], len(self.node.failures()))
        yield pods


class Node:
    def __init__(self, config: Config, dir_config: Callable[[str], Config], notifier: Notifier | None = None,
                 ports: Ports | None = None) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self._dir_config = dir_config
        self.ports = ports or Ports()
        self.notifier = notifier or Notifier()
        self.loop = EventLoop(self.notifier)
        self.log = logs.get(component="node")
        self.shared = Interner()
        self.members: dict[str, Member] = {}
        self._lock = threading.Lock()  # guards `members`, `_failed` and `_due`: the loop writes, HTTP threads read
        self._failed: dict[str, str] = {}  # name -> why it cannot be managed (logged once per distinct error)
        self._due: set[str] = set()  # namespaces to check at the next tick (/readyz saw drift)
        self._scanned = False
        self._rescan_at: float | None = None
        self._next_pass = 0.0
        self.state = AgentState("*", "node")  # for /readyz: its probe asks every namespace
        self.state.probe = self.ready
        self.socket = NodeSocket(self.state_dir, self.loop, self.handle, self.log)
        self._watch: netns.DirWatch | None = None
        self.pod_files = PodFiles(config.netns_config_dir)
        self._settings_watch: netns.DirWatch | None = None
        self._settings_seen = False  # the configuration directory changed: look at every pod's file
        self.ready_file = ReadyFile(self.state_dir)
        self._own = self.ports.identity("/proc/thread-self/ns/net")  # the node's own namespace: never a pod
        # The host probe table: the one thing written in the node's own namespace, and only when asked for.
        self.host = HostProbe(config, self.ports.kernel(OWN_NETNS), self.loop,
                              lambda: self.ports.events(OWN_NETNS, HOST_TABLE)) if config.ambient_host_rules else None

    # --- what other threads call ---

    def snapshot(self) -> list[Member]:
        with self._lock:
            return list(self.members.values())

    def failures(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)

    def ready(self) -> bool:
        """Every known namespace holds its ruleset (as of its last check or apply), and none is unmanageable."""
        bad = sorted(m.name for m in self.snapshot() if not m.controller.ready())
        if self.host is not None and not self.host.ready():
            bad.insert(0, HOST_NAME)
        failed = self.failures()
        ready = self._scanned and not bad and not failed
        if ready:
            why = ""
        elif not self._scanned:
            why = "starting"
        else:
            parts = []
            if bad:
                parts.append(f"{len(bad)} namespaces do not hold their ruleset: " + "; ".join(
                    f"{name} ({self._last_error(name)})" for name in bad[:MAX_DETAIL]))
            if failed:
                parts.append(f"{len(failed)} namespaces cannot be managed: " + "; ".join(
                    f"{name} ({failed[name]})" for name in sorted(failed)[:MAX_DETAIL]))
            why = " | ".join(parts)
        with self.state.lock:
            self.state.ready = ready
            self.state.last_error = why
        return ready

    def _last_error(self, name: str) -> str:
        member = self.members.get(name)
        controller = self.host.controller if name == HOST_NAME and self.host else member.controller if member else None
        if controller is None:
            return "gone"
        with controller.state.lock:
            return controller.state.last_error or "drift seen, repair pending"

    def request_check(self, name: str) -> None:
        with self._lock:
            self._due.add(name)
        self.loop.wake()

    # --- discovering namespaces ---

    def discover(self) -> tuple[dict[str, tuple[Source, nodestate.Record | None]], bool]:
        """What should be managed now, and whether a namespace file was seen half-created; what cannot be
        managed is noted (log once, metric, /readyz) until it goes or can be."""
        result = discovery.discover(self.config.netns_dir, self.state_dir, self.ports.identity, self._own,
                                    {name: m.source for name, m in self.members.items()})
        with self._lock:  # a namespace that is no longer there is no longer a failure either
            for name in [n for n in self._failed if n not in result.found and n not in result.refused]:
                del self._failed[name]
        for name, why in result.refused.items():
            self._note_failure(name, why)
        return result.found, result.pending

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
        """Take the namespace on: adopt its table if it is what we applied before, else apply. None (and the
        failure noted for log, metric and /readyz) when it cannot be managed now; the next pass tries again."""
        started = time.monotonic()
        try:
            member = self._member(source, record)
        except InterceptdError as exc:
            self._note_failure(source.name, str(exc))
            return None
        with self._lock:
            self._failed.pop(source.name, None)
        member.events.set(member.controller.config.kernel_events)  # before any apply: nothing unseen
        adopted = record is not None and member.controller.adopt(record.listing, record.ruleset_digest,
                                                                 self.shared.digest)
        if not adopted:
            member.controller.apply_desired("start")
        self._save(member, record)
        self.pod_files.take(member.name, member.pod)
        with self._lock:
            self.members[source.name] = member
        self._host_pod(member)
        member.controller.log.info("manage", source=source.kind, path=source.path, adopted=adopted,
                                   duration_ms=round((time.monotonic() - started) * 1000, 3))
        return member

    def _member(self, source: Source, record: nodestate.Record | None) -> Member:
        pod: Pod = NO_POD
        addresses: tuple[str, ...] = ()
        if source.kind == "cni" and record is not None:
            pod, addresses = record.pod, tuple(record.addresses)
            reload = podsettings.cni_loader(record, self.config.netns_config_dir)
            try:
                config = reload()
            except ConfigError as exc:  # a bad live file: the pod keeps the settings it came with
                self.log.warning("live settings refused", netns=source.name, pod=podsettings.label(pod),
                                 error=str(exc))
                config = record.config()
        else:
            config = self._dir_config(source.name)
            reload = lambda: self._dir_config(source.name)  # noqa: E731
        if config.own_table:
            raise ConfigError(f"network namespace {source.name}: own_table cannot be used with node (an owned "
                              f"table lives only as long as the libnftables context that made it)")
        claim = self.ports.claim(source.path, config.table)
        claim.acquire()  # LockedError: another interceptd keeps this pod's table; reported, tried again next pass
        try:
            kernel = self.ports.kernel(source.path)
            controller = TableController(
                config, kernel=kernel, router=self.ports.router(source.path),
                facts=lambda cfg: self.ports.facts(source.path, cfg), load=reload,
                log=logs.get(table=config.table, netns=source.name,
                             **({"pod": podsettings.label(pod)} if all(pod) else {})),
                on_drift=lambda: self.request_check(source.name), share=self.shared)
        except BaseException:
            claim.release()
            raise
        events = TableEvents(self.loop, lambda: self.ports.events(source.path, controller.config.table), controller)
        return Member(source, controller, Collector(kernel, controller.state), events, claim, pod=pod,
                      addresses=addresses)

    def _host_pod(self, member: Member) -> None:
        """Tell the host probe table where a managed pod is reached: a CNI pod at its recorded addresses, a
        watched-directory pod at what its own interfaces hold (read only for an ambient pod, as it may be given
        its addresses after the namespace appeared: each periodic pass reads them again)."""
        if self.host is None:
            return
        addresses: Iterable[str] = member.addresses
        if member.source.kind != "cni" and member.controller.config.ambient:
            try:
                addresses = self.ports.addresses(member.source.path)
            except (OSError, InterceptdError) as exc:  # the namespace going: the sets keep what they hold
                member.controller.log.warning("cannot read the namespace's addresses", error=str(exc))
                return
        self.host.pod_up(member.name, member.controller.config, addresses)

    def forget(self, member: Member, why: str, remove_record: bool) -> None:
        """Stop managing a namespace; its rules are left as they are (the namespace usually went with them)."""
        with self._lock:
            if self.members.get(member.name) is member:
                del self.members[member.name]
            self._due.discard(member.name)
        member.events.set(False)
        if member.claim is not None:
            member.claim.release()
        if remove_record:
            nodestate.remove(self.state_dir, member.name)
        if self.host is not None:
            self.host.pod_gone(member.name)
        self.pod_files.forget(member.name)
        member.controller.log.info("forget", why=why)

    def _note_failure(self, name: str, error: str) -> None:
        with self._lock:
            new = self._failed.get(name) != error
            self._failed[name] = error
        if new:
            self.log.warning("cannot manage namespace", netns=name, error=error)

    def _save(self, member: Member, record: nodestate.Record | None = None) -> None:
        """Rewrite the state file when the reference changed (after an apply), so a restart can adopt."""
        applied = member.controller.applied
        if applied is None or applied is member.saved:
            return
        old = record if record is not None else nodestate.read(self.state_dir, member.name)
        settings = old.settings if old is not None and member.source.kind == "cni" else {}
        try:
            nodestate.write(self.state_dir, nodestate.Record(
                member.name, member.source.path, member.source.kind, settings, applied.listing,
                self.shared.digest(applied.ruleset), old.container_id if old else "",
                addresses=old.addresses if old is not None and member.source.kind == "cni" else (), pod=member.pod))
        except (OSError, InterceptdError) as exc:
            # The record only lets a restart adopt the table untouched: without it the pod is still kept, and
            # a restart re-applies. Said once per apply, never the end of the node.
            member.controller.log.warning("cannot write the namespace's state file", error=str(exc))
            return
        member.saved = applied

    def _still_there(self, member: Member) -> bool:
        if self.ports.identity(member.source.path) != member.source.ident:
            return False
        return member.source.kind != "cni" or nodestate.exists(self.state_dir, member.name)

    # --- the steps, one namespace at a time ---

    def _step(self, member: Member, what: Callable[[TableController], object], step: str) -> None:
        """Run one controller step on a namespace that is still there; a namespace that went is forgotten,
        never repaired (DEL removes the table on purpose). The controller turns kernel-side failures into a
        retry; anything else a namespace throws (its files vanishing mid-step) is that namespace's failure
        too, never the node's."""
        if not self._still_there(member):
            self.forget(member, "gone", remove_record=True)
            return
        try:
            what(member.controller)
        except (InterceptdError, OSError) as exc:
            member.controller.failed(step, str(exc))
        self._save(member)

    def check(self, member: Member, trigger: str) -> None:
        self._step(member, lambda c: c.check(trigger), "check")

    def check_all(self, trigger: str = "timer") -> float:
        """The backstop: one full reconcile pass over every namespace; returns its duration in seconds."""
        started = time.monotonic()
        for member in list(self.members.values()):
            if member.controller.retry_at is None:
                self.check(member, trigger)
        if self.host is not None:
            for member in list(self.members.values()):
                self._host_pod(member)  # a watched-directory pod's addresses, a pod's mode changed live
            self.host.check(trigger)
        return time.monotonic() - started

    def reload_all(self) -> None:
        """SIGHUP: every namespace re-reads its settings (the watched directory's, the node's file too) and
        its live settings file; each one whose ruleset changed is rewritten, the others are left alone."""
        for member in list(self.members.values()):
            self.pod_files.take(member.name, member.pod)
            self._step(member, lambda c: c.reload(), "reload")

    def apply_pod_settings(self) -> None:
        """The pods whose live settings file changed are reloaded, each on its own (controller.reload: one
        transaction with only what differs, or one refusal logged and the rules kept)."""
        for member in list(self.members.values()):
            if self.pod_files.changed(member.name, member.pod):
                self._step(member, lambda c: c.reload(), "settings")

    def tick(self) -> float | None:
        """One turn of the loop: settings, events, /readyz requests, rescans, retries and the periodic pass."""
        if self._settings_seen:
            self._settings_seen = False
            self.apply_pod_settings()
        changed = {m.name for m in self.members.values() if m.events.take()}
        with self._lock:
            changed |= self._due
            self._due.clear()
        for name in sorted(changed):
            member = self.members.get(name)
            if member is not None and member.controller.retry_at is None:
                self.check(member, "event")
        now = time.monotonic()
        if self._rescan_at is not None and now >= self._rescan_at:
            self._rescan_at = now + RESCAN_SOON_S if self.scan() else None
        for member in [m for m in self.members.values() if m.controller.retry_due(now)]:
            self._step(member, lambda c: c.apply_desired("retry"), "retry")
        if now >= self._next_pass:
            if self.scan():
                self._rescan_at = now + RESCAN_SOON_S
            self._watch_settings()
            self.apply_pod_settings()  # the backstop when the directory cannot be watched
            scanned = time.monotonic()
            checked = self.check_all("timer")
            self.log.debug("pass", namespaces=len(self.members), scan_ms=round((scanned - now) * 1000, 3),
                           check_ms=round(checked * 1000, 3))
            self.notifier.status(self.status_line())
            trim_heap()  # a pass reads every namespace's listing: give the heap back
            self._next_pass = time.monotonic() + self.config.reconcile_interval
        self.socket.expire(time.monotonic())
        self._publish_readiness()
        deadlines = [m.controller.retry_at for m in self.members.values() if m.controller.retry_at is not None]
        deadlines += self.socket.deadlines()
        host_retry = self.host.tick(time.monotonic()) if self.host is not None else None
        deadlines += [host_retry] if host_retry is not None else []
        return min([self._next_pass, *deadlines, *([self._rescan_at] if self._rescan_at is not None else [])])

    def _publish_readiness(self) -> None:
        """The readiness file follows "every known pod verified" (runtime.readiness)."""
        try:
            self.ready_file.show(self.ready(), len(self.members))
        except OSError as exc:
            self.log.warning("cannot write the readiness file", path=self.ready_file.path, error=str(exc))

    # --- the socket: registrations from interceptd-cni, status queries ---

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op, name = message.get("op"), str(message.get("name", ""))
        member = self.members.get(name)
        if op == "add":
            record = nodestate.read(self.state_dir, name)
            ident = self.ports.identity(record.path) if record is not None and record.source == "cni" else None
            if record is None or ident is None:
                return {"ok": False, "error": f"network namespace {name}: no usable CNI record"}
            if record.opted_out:
                # The watched directory may have brought the namespace in before its opt-out arrived: the opt-out
                # wins, and the rules it got meanwhile go.
                for taken in [m for m in self.members.values() if m.source.ident == ident]:
                    self._step(taken, lambda c: c.remove(), "opt-out")
                    self.forget(taken, "opted out", remove_record=False)
                return {"ok": True, "ready": True}
            if ident == self._own:
                return {"ok": False, "error": f"network namespace {name}: {record.path!r} is the node agent's own "
                                              f"network namespace: never managed"}
            if member is not None:
                self.forget(member, "registered again", remove_record=False)
            added = self.manage(Source(name, record.path, "cni", ident), record)
            if added is None:
                return {"ok": False, "error": self.failures().get(name, "cannot manage")}
            return {"ok": True, "ready": added.controller.ready()}
        if op == "del":
            if member is not None and member.source.kind == "cni":
                self.forget(member, "unregistered", remove_record=False)
            return {"ok": True}
        if op == "status":
            if member is None:
                return {"ok": False, "error": f"network namespace {name} is not managed by the node agent"}
            with member.controller.state.lock:
                s = member.controller.state
                return {"ok": True, "source": member.source.kind, "path": member.source.path, "ready": s.ready,
                        "pod": podsettings.label(member.pod),
                        "generation": s.generation, "repairs": sum(s.drift_repairs.values()),
                        "last_error": s.last_error}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # --- lifecycle ---

    def run(self) -> int:
        lock = Lock(self.state_dir, "node", family="node")
        try:
            lock.acquire()
        except LockedError as exc:
            raise LockedError(f"another interceptd node agent runs with --state-dir {self.state_dir!r}: {exc}") \
                from None
        metrics = None
        try:
            raise_nofile_limit()  # a few descriptors per namespace, all above 1024
            if self.config.metrics_address:
                reg = CollectorRegistry(auto_describe=False)
                reg.register(NodeCollector(self))
                ProcessCollector(registry=reg)
                metrics = MetricsServer(self.config.metrics_address, reg, self.state).start()
            self.socket.open()
            if self.config.netns_dir:
                os.makedirs(self.config.netns_dir, mode=0o755, exist_ok=True)
                discovery.check_netns_dir(self.config.netns_dir)
                self._watch = netns.DirWatch(self.config.netns_dir)
                self.loop.watch(self._watch, self._on_watch)
            self._watch_settings()
            self.loop.run(self._first_tick, self.reload_all)
        finally:
            self.notifier.stopping()
            self._close()
            if metrics is not None:
                metrics.stop()
            lock.release()
        return 0

    def _first_tick(self) -> float | None:
        """The start (inside the loop, so SIGTERM during a long start is a clean stop): scan and apply all."""
        if self._scanned:
            return self.tick()
        started = time.monotonic()
        self._rescan_at = time.monotonic() + RESCAN_SOON_S if self.scan() else None
        if self.host is not None:
            self.host.start()  # after the scan: its sets hold every ambient pod found
        self._scanned = True
        self.log.info("start", namespaces=len(self.members), unmanaged=len(self._failed),
                      duration_ms=round((time.monotonic() - started) * 1000, 3))
        self.notifier.ready(self.status_line())
        self._next_pass = time.monotonic() + self.config.reconcile_interval
        return self.tick()

    def _watch_settings(self) -> None:
        """Watch the live settings directory once it exists (until then each pass looks at the files)."""
        directory = self.config.netns_config_dir
        if self._settings_watch is not None or not directory or not os.path.isdir(directory):
            return
        try:
            self._settings_watch = netns.DirWatch(directory, netns.FILE_CHANGES)
        except OSError as exc:
            self.log.warning("cannot watch the live settings directory; looked at each pass", path=directory,
                             error=str(exc))
            return
        self.loop.watch(self._settings_watch, self._on_settings)
        self._settings_seen = True  # what changed before the watch began

    def _on_settings(self) -> None:
        assert self._settings_watch is not None
        self._settings_watch.drain()
        self._settings_seen = True

    def _on_watch(self) -> None:
        assert self._watch is not None
        self._watch.drain()
        self._rescan_at = time.monotonic()

    def status_line(self) -> str:
        members = self.snapshot()
        ready = sum(1 for m in members if m.controller.ready())
        failed = len(self.failures())
        return f"node: {len(members)} namespaces, {ready} ready" + (f", {failed} unmanaged" if failed else "")

    def _close(self) -> None:
        """Release everything; every namespace keeps its rules (fail closed)."""
        for member in list(self.members.values()):
            member.events.set(False)
            if member.claim is not None:
                member.claim.release()
        with self._lock:
            self.members.clear()
        if self.host is not None:
            self.host.close()
        self.socket.close()
        for watch in (self._watch, self._settings_watch):
            if watch is not None:
                watch.close()
        self.ready_file.clear()  # no agent, nobody to vouch for the pods
        self.loop.close()
        self.log.info("stop")


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
    pod = f" (pod {reply['pod']})" if reply.get("pod") else ""
    return (f"node agent: {reply['source']} namespace {reply['path']}{pod}, generation {reply['generation']}, "
            f"{health}, {reply['repairs']} repairs")
