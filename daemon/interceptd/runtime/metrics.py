"""Prometheus metrics read at scrape time, and the small HTTP server for /metrics, /healthz and /readyz.

No background poller: each scrape lists interceptd's named counters once (one libnftables call, only
interceptd's table; no rules or sets, so the answer does not grow with the lists) and turns them into
fresh metric families: the numbers are as current as the scrape and cost nothing between scrapes. A
counter's name "<chain>/<rule>" carries both labels. The agent's own numbers come from a snapshot of AgentState.

nat chains see only the first packet of a connection: their "packets" count connections.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from interceptd import __version__
from interceptd.control.state import CHECK_RESULTS, CHECK_TRIGGERS, TRIGGERS, AgentState
from interceptd.errors import InterceptdError
from interceptd.ruleset.doctor import CONFLICT_KINDS
from interceptd.ruleset.drift import REASONS
from interceptd.ruleset.names import ENTRY, split_counter_name
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.status import counters
from interceptd.runtime.httpd import HttpServer, Request, Response
from interceptd.system.kernel import Kernel

RESULTS = ("success", "error")
Key = tuple[str, str]  # (chain, rule); rule "entry" is the chain's own counter


class Monotonic:
    """Keeps exported counters from going backwards when the kernel's named counters restart at zero.

    Named counters keep their values across every re-apply (the table is flushed, never deleted), but a
    table deleted from outside takes them along and the repair creates them anew. A value lower than the
    last one seen, or a counter that was missing at the previous scrape, is such a restart: the last value
    seen becomes an offset. Traffic between the last scrape and the deletion is lost; nothing goes down.
    """

    def __init__(self) -> None:
        self._last: dict[Key, tuple[int, int]] = {}
        self._offset: dict[Key, tuple[int, int]] = {}
        self._present: set[Key] = set()

    def update(self, raw: dict[Key, tuple[int, int]]) -> dict[Key, tuple[int, int]]:
        out: dict[Key, tuple[int, int]] = {}
        for key, (pkts, nbytes) in raw.items():
            last = self._last.get(key)
            if last is not None and (key not in self._present or pkts < last[0] or nbytes < last[1]):
                base = self._offset.get(key, (0, 0))
                self._offset[key] = (base[0] + last[0], base[1] + last[1])
            self._last[key] = (pkts, nbytes)
            base = self._offset.get(key, (0, 0))
            out[key] = (base[0] + pkts, base[1] + nbytes)
        self._present = set(raw)
        return out


def kernel_counters(listing: list[Json]) -> dict[Key, tuple[int, int]]:
    """(chain, rule) -> (packets, bytes) from the named counters "<chain>/<rule>" (rule "entry": the chain)."""
    out: dict[Key, tuple[int, int]] = {}
    for name, value in counters(listing).items():
        out[split_counter_name(name)] = value
    return out


class Collector:
    """The custom prometheus_client collector: kernel counters plus the agent's state, built per scrape."""

    def __init__(self, kernel: Kernel, state: AgentState, family: str = "inet") -> None:
        self.kernel = kernel
        self.state = state
        self.family = family
        self.monotonic = Monotonic()
        self.errors = 0
        self._lock = threading.Lock()  # concurrent scrapes must not interleave Monotonic updates

    def describe(self) -> list[Metric]:
        """Nothing to describe up front: registering must not read the kernel."""
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            started = time.perf_counter()
            state = self.state.snapshot()
            families = [*self._kernel_families(state.table), *agent_families(state)]
            duration = time.perf_counter() - started
            errors = self.errors
        yield from families
        yield GaugeMetricFamily("interceptd_scrape_duration_seconds",
                                "Time this scrape took to read the kernel's counters and the agent's state.",
                                value=duration)
        yield CounterMetricFamily("interceptd_scrape_errors",
                                  "Scrapes whose kernel read failed (the counter families are then missing).",
                                  value=errors)

    def _kernel_families(self, table: str) -> list[Metric]:
        try:
            listing = self.kernel.list_counters(table, self.family)
        except InterceptdError:
            self.errors += 1
            return []
        values = self.monotonic.update(kernel_counters(listing or []))
        chain_pkts = CounterMetricFamily(
            "interceptd_chain_packets", "Packets that entered each chain of interceptd's table (nat chains: "
            "connections, they see only a connection's first packet).", labels=["chain"])
        chain_bytes = CounterMetricFamily(
            "interceptd_chain_bytes", "Bytes of the packets counted by interceptd_chain_packets_total.",
            labels=["chain"])
        rule_pkts = CounterMetricFamily(
            "interceptd_rule_packets", "Packets each deciding rule matched, by the rule's stable name "
            "(nat chains: connections).", labels=["chain", "rule"])
        rule_bytes = CounterMetricFamily(
            "interceptd_rule_bytes", "Bytes of the packets counted by interceptd_rule_packets_total.",
            labels=["chain", "rule"])
        for (chain, rule), (pkts, nbytes) in values.items():
            if rule == ENTRY:
                chain_pkts.add_metric([chain], pkts)
                chain_bytes.add_metric([chain], nbytes)
            else:
                rule_pkts.add_metric([chain, rule], pkts)
                rule_bytes.add_metric([chain, rule], nbytes)
        return [chain_pkts, chain_bytes, rule_pkts, rule_bytes]


def agent_families(state: AgentState) -> list[Metric]:
    """The agent's own health, from a snapshot; every known label combination is present from the start
    (at 0), so the first repair or error is an increase Prometheus can see, not a new series."""
    applies = CounterMetricFamily("interceptd_applies", "Ruleset applies, by what triggered them and result.",
                                  labels=["trigger", "result"])
    for key in _keys(state.applies, TRIGGERS, RESULTS):
        applies.add_metric(list(key), state.applies[key])
    checks = CounterMetricFamily("interceptd_reconcile_checks",
                                 "Comparisons of the kernel's table with the applied ruleset, by trigger and "
                                 "result (match, drift, error).", labels=["trigger", "result"])
    for key in _keys(state.reconcile_checks, CHECK_TRIGGERS, CHECK_RESULTS):
        checks.add_metric(list(key), state.reconcile_checks[key])
    repairs = CounterMetricFamily("interceptd_drift_repairs", "Drift found in the kernel and repaired, by reason.",
                                  labels=["reason"])
    for reason in sorted({*REASONS, *state.drift_repairs}):
        repairs.add_metric([reason], state.drift_repairs[reason])
    reloads = CounterMetricFamily("interceptd_config_reloads", "Configuration reloads (SIGHUP), by result.",
                                  labels=["result"])
    for result in RESULTS:
        reloads.add_metric([result], state.reloads[result])
    hist = state.apply_durations
    durations = HistogramMetricFamily(
        "interceptd_apply_duration_seconds", "Duration of successful applies (list, transaction, list back).",
        buckets=[("+Inf" if math.isinf(bound) else str(bound), count) for bound, count in hist.cumulative()],
        sum_value=hist.sum)
    ruleset = InfoMetricFamily("interceptd_ruleset", "The ruleset the agent applied; generation grows with "
                               "each new ruleset (start, reload).", labels=["table", "mode", "generation"])
    ruleset.add_metric([state.table, state.mode, str(state.generation)], {})
    build = InfoMetricFamily("interceptd_build", "interceptd's version.", value={"version": __version__})
    conflicts = GaugeMetricFamily("interceptd_conflicts", "What the agent's periodic doctor found, by check: "
                                  "other tables' chains, iptables rules, missing listeners, ... (0 = none).",
                                  labels=["kind"])
    for kind in CONFLICT_KINDS:
        conflicts.add_metric([kind], len(state.conflicts.get(kind, [])))
    return [
        applies, checks, repairs, reloads, durations, ruleset, build,
        GaugeMetricFamily("interceptd_config_last_reload_successful",
                          "1 if the last configuration reload (or the start) succeeded, else 0.",
                          value=int(state.last_reload_successful)),
        GaugeMetricFamily("interceptd_config_last_reload_success_timestamp_seconds",
                          "Unix time of the last successful configuration load.",
                          value=state.last_reload_success_ts),
        GaugeMetricFamily("interceptd_ready", "1 when the ruleset is applied and matched the kernel at the last "
                          "check (what /readyz reports), else 0.", value=int(state.ready)),
        conflicts,
    ]


def _keys(counts: dict[tuple[str, str], int], first: tuple[str, ...], second: tuple[str, ...],
          ) -> list[tuple[str, str]]:
    return sorted({*counts, *((a, b) for a in first for b in second)})


def registry(kernel: Kernel, state: AgentState) -> CollectorRegistry:
    """A private registry: interceptd's collector and the standard process_* metrics (memory, CPU, fds)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(kernel, state))
    ProcessCollector(registry=reg)
    return reg


class MetricsServer:
    """/metrics, /healthz and /readyz on one address (GET and HEAD), served by a bounded HttpServer:
    no client, idle or slow, can take the descriptors or the time the repairs need (see runtime.httpd)."""

    def __init__(self, address: tuple[str, int], kernel: Kernel | CollectorRegistry, state: AgentState) -> None:
        """`kernel`: one table's kernel, or a ready registry (the node agent's, over many namespaces)."""
        self.state = state
        self.registry = kernel if isinstance(kernel, CollectorRegistry) else registry(kernel, state)
        self.http = HttpServer(address, self.answer)
        self.server_address = self.http.server_address

    def answer(self, request: Request) -> Response:
        if request.path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(200, encoder(self.registry), content_type)
        if request.path == "/healthz":
            return Response(200, b"ok\n")
        if request.path == "/readyz":
            matches = self.state.kernel_matches()
            with self.state.lock:
                notes = "".join(f"conflict ({kind}): {c}\n" for kind, found in sorted(self.state.conflicts.items())
                                for c in found)
                drift = "; ".join(self.state.drift_seen)
                why = self.state.last_error or (f"the kernel differs from the applied ruleset: {drift}" if drift else
                                                "the ruleset is not applied or does not match the kernel")
            if matches:
                return Response(200, f"ready\n{notes}".encode())
            return Response(503, f"not ready: {why}\n{notes}".encode())
        return Response(404, b"not found: try /metrics, /healthz or /readyz\n")

    def start(self) -> MetricsServer:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()
