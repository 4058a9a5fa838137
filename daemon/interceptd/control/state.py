"""What the agent knows about itself, shared with the metrics Collector and /readyz.

The agent writes these fields under `lock`; the metrics endpoint reads a consistent copy at scrape time
with `snapshot()`. Nothing here imports prometheus: the Collector maps fields to metric families.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Upper bounds (seconds) of the apply-duration histogram buckets; +Inf is implicit.
APPLY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

TRIGGERS = ("start", "reload", "repair", "retry")  # keys of AgentState.applies
CHECK_TRIGGERS = ("event", "timer")  # keys of AgentState.reconcile_checks
CHECK_RESULTS = ("match", "drift", "error")


@dataclass
class Histogram:
    """Apply durations as fixed buckets (non-cumulative counts per bucket, plus +Inf), sum and count.

    Buckets rather than a list of samples: constant memory however long the agent runs.
    """

    bounds: tuple[float, ...] = APPLY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(APPLY_BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if seconds <= bound), len(self.bounds))
        self.counts[index] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs ending with (inf, count), as Prometheus wants them."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass
class AgentState:
    """The agent's counters and status; mutate only while holding `lock`."""

    table: str
    mode: str  # REDIRECT or TPROXY
    generation: int = 0  # bumped by each successful apply of a new ruleset (start, reload)
    ready: bool = False  # the last apply succeeded and the kernel matched at the last check
    last_error: str = ""
    applies: Counter[tuple[str, str]] = field(default_factory=Counter)  # (trigger, "success"|"error")
    drift_repairs: Counter[str] = field(default_factory=Counter)  # reason, e.g. "table missing"
    reconcile_checks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (trigger, result)
    apply_durations: Histogram = field(default_factory=Histogram)  # successful applies only
    reloads: Counter[str] = field(default_factory=Counter)  # "success" | "error"
    last_reload_successful: bool = True
    last_reload_success_ts: float = 0.0  # time.time() of the last good reload (or of the start)
    last_apply_success_ts: float = 0.0
    kernel_events: bool = False  # whether netlink events are being listened to
    drift_seen: list[str] = field(default_factory=list)  # what /readyz's last look found different, in words
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # doctor's last look: check -> culprits
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # Set by the agent: compares the kernel with the applied ruleset now (for /readyz); None before start.
    probe: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    def snapshot(self) -> AgentState:
        """A consistent copy for a scrape, taken under the lock (the copy has its own lock)."""
        with self.lock:
            fields = {name: copy.deepcopy(getattr(self, name))
                      for name in self.__dataclass_fields__ if name not in ("lock", "probe")}
        return AgentState(**fields)

    def kernel_matches(self) -> bool:
        """Does the kernel hold our ruleset right now? Asks the kernel when the agent is running."""
        probe = self.probe
        if probe is None:
            with self.lock:
                return self.ready
        return probe()
