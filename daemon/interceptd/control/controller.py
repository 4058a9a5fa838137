"""The per-table controller: keep one ruleset in one (network namespace, table), whatever happens to it.

It applies, checks, repairs, reloads and backs off, and it knows nothing of how it is driven: no selector,
pipe, signal or thread of its own. The agent (`interceptd run`) drives one controller from its event loop,
the node agent one per pod namespace from the same kind of loop; unit tests call the steps directly with
the fake kernel and router (system.fake).

Failure handling is by kind, in one place: every failure on the kernel's side (errors.KernelSideError: a
refused transaction or listing, refused TPROXY routes, a namespace gone, no descriptor left) makes this
table "not ready" and schedules a retry with capped exponential backoff. Nothing one table meets can end
the process that drives many. A configuration error (errors.ConfigError, HostError) is not retried: the
running ruleset stays and the next reload decides.

Every step reports through `state` (for metrics and /readyz) and one log event with the same fields
(generation, duration_ms, drift, error), so an operator reads start, repair, reload and failure alike.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from interceptd.config import OPTIONS, OPTIONS_BY_KEY, Config
from interceptd.control import install, reconcile
from interceptd.control.install import Applied
from interceptd.control.state import AgentState
from interceptd.errors import ConfigError, InterceptdError, KernelSideError
from interceptd.ruleset.drift import Difference, compare, primary_reason, summary
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Json, normalise
from interceptd.ruleset.render import render
from interceptd.ruleset.tablediff import differences
from interceptd.system.kernel import Kernel
from interceptd.system.routes import Router

Renderer = Callable[[Config, HostFacts], Ruleset]  # a pod's table by default (ruleset.render.render)

# A reload cannot move the controller to another table, lock or listener: those need a restart.
RESTART_KEYS = ("table", "state_dir", "metrics_address", "own_table")
# More repairs than this within the window means another controller keeps rewriting our table: repairing at
# full speed would only burn CPU in a tug of war, so further repairs wait a growing delay (and say why).
REPAIR_BURST, REPAIR_WINDOW_S = 100, 5.0  # 20 repairs a second, sustained


class EventLog(Protocol):
    """What the controller logs through: a structlog bound logger fits (injected, so this layer needs no
    logging set-up and tests can capture events)."""

    def debug(self, event: str, **kw: Any) -> Any: ...
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...


class Backoff:
    """Capped exponential delays between retries of a failed apply."""

    def __init__(self, first: float = 0.2, cap: float = 30.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


def capture_mode(config: Config) -> str:
    """The `mode` of metrics and status: "ambient" for the node proxy's in-pod rules, else the sidecar's
    inbound mode (REDIRECT or TPROXY)."""
    return "ambient" if config.ambient else config.inbound_interception_mode


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


class TableController:
    """One table in one namespace. Build it with a rendered-able config: a bad one raises before any change."""

    def __init__(self, config: Config, *, kernel: Kernel, router: Router, facts: Callable[[Config], HostFacts],
                 load: Callable[[], Config], log: EventLog, on_drift: Callable[[], None] = lambda: None,
                 share: Callable[[Applied], Applied] = lambda applied: applied, renderer: Renderer = render) -> None:
        """`facts` reads the target namespace, `load` re-reads the configuration for a reload, `on_drift` is
        called (from any thread) when /readyz finds drift, so that the driver schedules a check now. `share`
        may swap an Applied for an equal one whose ruleset and listing other tables hold already (node mode).
        `renderer` makes the ruleset (a pod's table by default; the node's host probe table has its own)."""
        self.config = config
        self.kernel = kernel
        self.router = router
        self._facts = facts
        self._load = load
        self.log = log
        self._on_drift = on_drift
        self._share = share
        self._render = renderer
        self.ruleset: Ruleset = renderer(config, facts(config))  # a bad config fails before any change
        self.state = AgentState(self.ruleset.table, capture_mode(config))
        self.state.probe = self.kernel_matches
        self.applied: Applied | None = None  # the reference for drift checks; None until an apply succeeded
        self.retry_at: float | None = None  # monotonic deadline of the next retry of a failed apply
        self.backoff = Backoff()
        self._repairs: deque[float] = deque(maxlen=REPAIR_BURST)  # when the latest repairs happened
        self._fight = Backoff(cap=5.0)
        self._kernel_lock = threading.Lock()  # an apply and the reference it yields change together

    # --- the steps ---

    def _install(self, ruleset: Ruleset, trigger: str) -> Applied:
        """Apply `ruleset` and make it the reference; count and time it. KernelSideError: nothing changed.
        When the kernel still holds the last apply, only the sets and rules that differ are rewritten."""
        try:
            with self._kernel_lock:
                previous = self.applied
                applied = self._share(install.apply(self.kernel, self.router, ruleset, previous=previous))
                self.applied, self.ruleset = applied, applied.ruleset
        except KernelSideError:
            with self.state.lock:
                self.state.applies[trigger, "error"] += 1
            raise
        with self.state.lock:
            self.state.applies[trigger, "success"] += 1
            self.state.apply_durations.observe(applied.duration_s)
            if previous is None or previous.ruleset != ruleset:
                self.state.generation += 1
            self.state.ready = True
            self.state.last_error = ""
            self.state.last_apply_success_ts = time.time()
        return applied

    def apply_desired(self, trigger: str, drift: list[Difference] | None = None, seen_by: str = "",
                      context: dict[str, str] | None = None) -> bool:
        """Install the desired ruleset (start, repair, retry); on failure report not ready and schedule a retry.
        `context`: more fields for its log event (the start's: mode, config file, metrics address)."""
        started = time.monotonic()
        details = summary(drift or [])
        first = self.applied is None
        extra: dict[str, Any] = {"seen_by": seen_by} if seen_by else {}  # what noticed the drift: event or timer
        extra.update(context or {})
        try:
            self._install(self.ruleset, trigger)
        except KernelSideError as exc:
            self.failed(trigger, str(exc), started, details, **extra)
            return False
        self.retry_at = None
        self.backoff.reset()
        if drift:
            with self.state.lock:
                self.state.drift_repairs[primary_reason(drift)] += 1
        if first:
            with self.state.lock:
                self.state.last_reload_success_ts = time.time()
        self.event("warning" if drift else "info", trigger, started, details, **extra)
        return True

    def update(self, trigger: str) -> bool:
        """The renderer's inputs changed (the node's ambient pods): render again and install what differs (only
        the changed sets and rules are rewritten). On failure: not ready, retry with the new ruleset after backoff."""
        started = time.monotonic()
        try:
            ruleset = self._render(self.config, self._facts(self.config))
        except InterceptdError as exc:
            self.failed(trigger, str(exc), started)
            return False
        if self.applied is not None and self.applied.ruleset == ruleset:
            return True
        self.ruleset = ruleset
        try:
            self._install(ruleset, trigger)
        except KernelSideError as exc:
            self.failed(trigger, str(exc), started)
            return False
        self.retry_at = None
        self.backoff.reset()
        self.event("info", trigger, started, [])
        return True

    def failed(self, step: str, error: str, started: float | None = None, details: list[str] | None = None,
               **extra: object) -> None:
        """A kernel-side failure of `step`: not ready, retry after the next backoff delay."""
        delay = self.backoff.next()
        self.retry_at = time.monotonic() + delay
        with self.state.lock:
            self.state.ready = False
            self.state.last_error = error
        self.event("error", step, time.monotonic() if started is None else started, details or [], error,
                   retry_in_s=delay, **extra)

    def check(self, trigger: str) -> list[Difference]:
        """Compare the kernel with the reference and repair any drift; returns what differed."""
        started = time.monotonic()
        try:
            with self._kernel_lock:
                if self.applied is None:
                    return []
                drift = reconcile.check(self.kernel, self.router, self.applied)
        except KernelSideError as exc:
            with self.state.lock:
                self.state.reconcile_checks[trigger, "error"] += 1
            self.failed("check", str(exc), started)
            return []
        with self.state.lock:
            self.state.reconcile_checks[trigger, "drift" if drift else "match"] += 1
            self.state.ready = not drift
        if drift:
            delay = self._fighting()
            if delay is not None:
                self.retry_at = time.monotonic() + delay
                self.event("warning", "repair-deferred", started, summary(drift),
                           f"the table was repaired {REPAIR_BURST} times in under {REPAIR_WINDOW_S:g} s: another "
                           "process keeps rewriting it", retry_in_s=delay, seen_by=trigger)
                return drift
            self._repairs.append(time.monotonic())
            self.apply_desired("repair", drift, seen_by=trigger)
        else:
            self.log.debug("check", trigger=trigger, duration_ms=_ms(started))
        return drift

    def _fighting(self) -> float | None:
        """The delay before the next repair when repairs come in a burst; None when calm (resets the delay)."""
        if len(self._repairs) == REPAIR_BURST and time.monotonic() - self._repairs[0] < REPAIR_WINDOW_S:
            return self._fight.next()
        self._fight.reset()
        return None

    def retry_due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at

    def reload(self) -> Config | None:
        """Read and render the new configuration completely, then swap it in with one transaction.

        Returns the new configuration, or None when it was refused: then nothing was applied (a refused
        transaction changes nothing) and the running ruleset stays.
        """
        started = time.monotonic()
        try:
            config = self._load()
            for key in RESTART_KEYS:
                if getattr(config, key) != getattr(self.config, key):
                    raise ConfigError(f"{OPTIONS_BY_KEY[key].flag} (key {key!r}) cannot change on reload: "
                                      f"restart the agent")
            ruleset = self._render(config, self._facts(config))
            previous = self.ruleset
            if self.applied is None or ruleset != self.applied.ruleset:
                self._install(ruleset, "reload")
            else:
                self.ruleset = ruleset
        except InterceptdError as exc:
            with self.state.lock:
                self.state.reloads["error"] += 1
                self.state.last_reload_successful = False
                self.state.last_error = str(exc)
            self.event("error", "reload", started, [], str(exc))
            return None
        self.retry_at = None
        self.backoff.reset()
        with self.state.lock:
            self.state.reloads["success"] += 1
            self.state.last_reload_successful = True
            self.state.last_reload_success_ts = time.time()
            self.state.mode = capture_mode(config)
        # What changed, so a reload is not a mystery: the settings by flag, the rules by name.
        changed = [o.flag for o in OPTIONS if getattr(config, o.key) != getattr(self.config, o.key)]
        self.event("info", "reload", started, [], changed=changed,
                   rules=summary(differences(previous, ruleset)) or ["unchanged"])
        self.config = config
        return config

    def adopt(self, listing: list[Json], ruleset_digest: str, digest: Callable[[Ruleset], str]) -> bool:
        """Take the kernel's table as ours, untouched, if it is exactly `listing` (what we applied before a
        restart) and our configuration still renders the ruleset whose digest was recorded with it."""
        if not listing or ruleset_digest != digest(self.ruleset):
            return False
        try:
            current = self.kernel.list_table(self.ruleset.table, self.ruleset.family)
        except KernelSideError:
            return False
        if current is None or compare(listing, normalise(current)):
            return False
        self.applied = self._share(Applied(self.ruleset, listing, 0.0))
        self.ruleset = self.applied.ruleset
        with self.state.lock:
            self.state.ready = True
            self.state.generation = 1
            self.state.last_apply_success_ts = self.state.last_reload_success_ts = time.time()
        return True

    def remove(self) -> None:
        """Delete the table and its routes (cleanup on exit); KernelSideError when refused."""
        with self._kernel_lock:
            install.remove(self.kernel, self.router, self.ruleset.table, self.ruleset.family)

    def kernel_matches(self) -> bool:
        """For /readyz, from any thread: does the kernel hold our ruleset now? Drift asks the driver to repair."""
        if self.retry_at is not None:
            return False
        try:
            with self._kernel_lock:
                if self.applied is None:
                    return False
                drift = reconcile.check(self.kernel, self.router, self.applied)
        except KernelSideError:
            return False
        with self.state.lock:
            self.state.drift_seen = summary(drift)[:3]  # /readyz says what differs, not only that
        if drift:
            self._on_drift()
        return not drift

    def ready(self) -> bool:
        """As of the last step (no kernel call): applied, matched at the last check, no retry pending."""
        with self.state.lock:
            return self.state.ready and self.retry_at is None

    def status_line(self) -> str:
        with self.state.lock:
            s = self.state
            health = "ready" if s.ready else f"NOT READY: {s.last_error}"
            return (f"table inet {s.table} generation {s.generation}: {health}; "
                    f"{sum(s.drift_repairs.values())} repairs, {sum(s.reloads.values())} reloads")

    def event(self, level: str, name: str, started: float, drift: list[str], error: str | None = None,
              **extra: object) -> None:
        """Every apply, repair, reload and failure: one event with the same fields."""
        with self.state.lock:
            generation = self.state.generation
        getattr(self.log, level)(name, generation=generation, duration_ms=_ms(started), drift=drift, error=error,
                                 **extra)
