"""`interceptd node --ambient-host-rules`: the host probe table in the node's own namespace, kept like a pod's.

The one place interceptd writes outside pod namespaces, so it is explicit (off by default) and narrow: one
table of its own (names.HOST_TABLE, rendered by ruleset.hostprobe), no policy routes (system.routes.NoRoutes:
the node's routes are never interceptd's), nothing else. Istio writes its host rule once; a firewalld reload
(`nft flush ruleset`) then leaves every ambient pod's probes failing until a restart. Here one
control.controller.TableController keeps it: applied at start, checked on the node namespace's own nftables
events and at every periodic pass, repaired on drift, retried with backoff.

Its sets follow the node's ambient pods: the node agent says which pods it manages (with their CNI-recorded
addresses) and which went; the changes of one loop turn go in as one transaction of element changes, never a
table rewrite. A watched-directory namespace has no record: the node reads its addresses from the namespace.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from interceptd.config import Config
from interceptd.control.controller import TableController
from interceptd.errors import InterceptdError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.hostprobe import render_host
from interceptd.ruleset.names import HOST_TABLE
from interceptd.runtime import logs
from interceptd.runtime.kevents import EventSource, TableEvents
from interceptd.runtime.loop import EventLoop
from interceptd.runtime.metrics import Collector
from interceptd.system.kernel import Kernel
from interceptd.system.routes import NoRoutes

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from interceptd.ruleset.facts import IPAddress

OWN_NETNS = "/proc/self/ns/net"  # the node agent's own network namespace: the node's
HOST_MODE = "host-probe"  # the `mode` label of its interceptd_ruleset_info
HOST_NAME = "host"  # the node namespace's name in logs, the `netns` metric label and /readyz
_NO_FACTS = HostFacts(ipv6=True, host_ip=None)  # the host table depends on no fact of the namespace


def addresses_of(texts: Iterable[str]) -> tuple[IPAddress, ...]:
    """A CNI record's addresses; one that does not parse is left out (the record is ours, but old)."""
    out: list[IPAddress] = []
    for text in texts:
        try:
            out.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    return tuple(out)


class HostProbe:
    """The host probe table's controller, its kernel events, and the ambient pods its sets hold."""

    def __init__(self, config: Config, kernel: Kernel, loop: EventLoop, open_events: Callable[[], EventSource]) -> None:
        self.loop = loop
        self.pods: dict[str, tuple[IPAddress, ...]] = {}  # namespace name -> its addresses (ambient pods only)
        self._dirty = False
        self.controller = TableController(
            config, kernel=kernel, router=NoRoutes(), facts=lambda _config: _NO_FACTS, load=lambda: config,
            log=logs.get(table=HOST_TABLE, netns=HOST_NAME), on_drift=self._drift_seen,
            renderer=lambda cfg, _facts: render_host(cfg, self.addresses()))
        self.controller.state.mode = HOST_MODE
        self.events = TableEvents(loop, open_events, self.controller)
        self.collector = Collector(kernel, self.controller.state)

    def addresses(self) -> list[IPAddress]:
        return [address for pod in self.pods.values() for address in pod]

    # --- the node's pods ---

    def pod_up(self, name: str, config: Config, addresses: Iterable[str]) -> None:
        """A namespace is managed with `config`: its addresses join the sets if it is an ambient pod."""
        found = addresses_of(addresses) if config.ambient else ()
        if self.pods.get(name, ()) != found:
            if found:
                self.pods[name] = found
            else:
                self.pods.pop(name, None)
            self._dirty = True

    def pod_gone(self, name: str) -> None:
        if self.pods.pop(name, None) is not None:
            self._dirty = True

    # --- the steps, from the node's loop ---

    def start(self) -> None:
        """Apply the table with the pods found at start (the node agent's first scan)."""
        self.events.set(self.controller.config.kernel_events)
        self._dirty = False
        self._step(lambda c: c.update("start"), "start")  # rendered now: the pods are known only from here

    def tick(self, now: float) -> float | None:
        """Events, pod changes and retries; returns the next retry's deadline, if one is pending."""
        if self.events.take() and self.controller.retry_at is None:
            self.check("event")
        if self._dirty:
            self._dirty = False  # the controller holds the newest ruleset from here, also for a retry
            self._step(lambda c: c.update("pods"), "pods")
        if self.controller.retry_due(now):
            self._step(lambda c: c.apply_desired("retry"), "retry")
        return self.controller.retry_at

    def check(self, trigger: str) -> None:
        if self.controller.retry_at is None:
            self._step(lambda c: c.check(trigger), "check")

    def ready(self) -> bool:
        return self.controller.ready()

    def close(self) -> None:
        """Stop watching; the table stays (fail closed: the pods' probes keep working while the agent is away)."""
        self.events.set(False)

    def _step(self, what: Callable[[TableController], object], step: str) -> None:
        """The controller turns kernel-side failures into a retry; anything else is this table's failure too,
        never the node's."""
        try:
            what(self.controller)
        except (InterceptdError, OSError) as exc:
            self.controller.failed(step, str(exc))

    def _drift_seen(self) -> None:
        """/readyz saw drift (from an HTTP thread): the loop checks at its next turn."""
        self.events.seen = True
        self.loop.wake()
