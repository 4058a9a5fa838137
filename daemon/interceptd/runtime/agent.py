"""The agent (`interceptd run`): apply the ruleset, then keep it in place until told to stop.

One thread does all the work in a select loop. Signal handlers only set a flag (the interpreter's wake-up
fd makes select return); kernel events, the periodic check, retries and the watchdog are deadlines of the
same loop. So a burst of SIGHUPs collapses into one reload, and nothing runs while another step is half
done. Other threads (the metrics endpoint) only read AgentState or call `kernel_matches`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

from interceptd.config import OPTIONS_BY_KEY, Config
from interceptd.control import install, reconcile
from interceptd.control.install import Applied
from interceptd.control.state import AgentState
from interceptd.errors import ConfigError, InterceptdError, KernelRefusedError, ListenError
from interceptd.ruleset.drift import Difference, primary_reason, summary
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.render import render
from interceptd.runtime import logs
from interceptd.runtime.lockfile import Lock
from interceptd.runtime.metrics import MetricsServer
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import host
from interceptd.system.events import NftEvents
from interceptd.system.kernel import Kernel, NftKernel
from interceptd.system.routes import Netlink, Router

# A reload cannot move the agent to another table, lock or listener: those need a restart.
RESTART_KEYS = ("table", "state_dir", "metrics_address", "own_table")
NO_PERSIST = ("libnftables or the kernel cannot set the persist flag: the owned table goes away when this agent "
              "exits (stop, crash or restart), and traffic is not captured until the next start")
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
# More repairs than this within the window means another controller keeps rewriting our table: repairing at
# full speed would only burn CPU in a tug of war, so further repairs wait a growing delay (and say why).
REPAIR_BURST, REPAIR_WINDOW_S = 100, 5.0  # 20 repairs a second, sustained


class Backoff:
    """Capped exponential delays between retries of a refused apply."""

    def __init__(self, first: float = 0.2, cap: float = 30.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


def catch_signals(wake_fd: int, handler: Callable[[int, FrameType | None], None]) -> Callable[[], None]:
    """Route SIGHUP/SIGTERM/SIGINT to `handler` (it only sets flags) and wake the loop through `wake_fd`;
    returns the function that puts back what was there before."""
    previous_fd = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc
        return None


def trim_heap() -> None:
    """Give the heap that a table listing used back to the system: a listing of 10,000 set elements is a
    few MB of short-lived objects, and without this the agent's resident memory stays at its high-water mark."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


class Agent:
    def __init__(self, config: Config, load: Callable[[], Config], kernel: Kernel | None = None,
                 facts: Callable[[Config], HostFacts] | None = None, notifier: Notifier | None = None,
                 router: Router | None = None) -> None:
        """`load` re-reads the configuration (file and environment) for SIGHUP; `facts` reads the host."""
        self.config = config
        self._load = load
        self._facts = facts or host.detect
        self.kernel: Kernel = NftKernel() if kernel is None else kernel
        self.router: Router = Netlink() if router is None else router
        self.notifier = notifier or Notifier()
        self.state = AgentState(config.table, config.inbound_interception_mode)
        self.state.probe = self.kernel_matches
        self.log = logs.get(table=config.table)
        self.ruleset: Ruleset = render(config, self._facts(config))  # a bad config fails before any change
        self.applied: Applied | None = None  # the reference for drift checks; None until an apply succeeded
        self.retry_at: float | None = None  # monotonic deadline of the next retry of a refused apply
        self.backoff = Backoff()
        self._repairs: deque[float] = deque(maxlen=REPAIR_BURST)  # when the latest repairs happened
        self._fight = Backoff(cap=5.0)
        self._kernel_lock = threading.Lock()  # an apply and the reference it yields change together
        self._events: NftEvents | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._reload_requested = False
        self._stop_requested = False
        self._check_requested = False

    # --- the steps (each one is also called directly by unit tests) ---

    def _install(self, ruleset: Ruleset, trigger: str) -> Applied:
        """Apply `ruleset` and make it the reference; count and time it. KernelRefusedError: nothing changed."""
        try:
            with self._kernel_lock:
                previous = self.applied
                applied = install.apply(self.kernel, self.router, ruleset)
                self.applied, self.ruleset = applied, ruleset
        except KernelRefusedError:
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
                      ) -> bool:
        """Install self.ruleset (start, repair, retry); on refusal report not-ready and schedule a retry."""
        started = time.monotonic()
        details = summary(drift or [])
        first = self.applied is None
        extra = {"seen_by": seen_by} if seen_by else {}  # what noticed the drift: event or timer
        try:
            self._install(self.ruleset, trigger)
        except KernelRefusedError as exc:
            delay = self.backoff.next()
            self.retry_at = time.monotonic() + delay
            with self.state.lock:
                self.state.ready = False
                self.state.last_error = str(exc)
            self._event("error", trigger, started, details, str(exc), retry_in_s=delay, **extra)
            self.notifier.status(self.status_line())
            return False
        self.retry_at = None
        self.backoff.reset()
        if drift:
            with self.state.lock:
                self.state.drift_repairs[primary_reason(drift)] += 1
        self._event("warning" if drift else "info", trigger, started, details, **extra)
        if first:
            with self.state.lock:
                self.state.last_reload_success_ts = time.time()
            self.notifier.ready(self.status_line())
        else:
            self.notifier.status(self.status_line())
        return True

    def check(self, trigger: str) -> list[Difference]:
        """Compare the kernel with the reference and repair any drift; returns what differed."""
        started = time.monotonic()
        try:
            with self._kernel_lock:
                if self.applied is None:
                    return []
                drift = reconcile.check(self.kernel, self.router, self.applied)
        except KernelRefusedError as exc:
            with self.state.lock:
                self.state.reconcile_checks[trigger, "error"] += 1
            self._event("error", "check", started, [], str(exc))
            return []
        with self.state.lock:
            self.state.reconcile_checks[trigger, "drift" if drift else "match"] += 1
            self.state.ready = not drift
        if drift:
            delay = self._fighting()
            if delay is not None:
                self.retry_at = time.monotonic() + delay
                self._event("warning", "repair-deferred", started, summary(drift),
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

    def reload(self) -> bool:
        """SIGHUP: read and render the new configuration completely, then swap it in with one transaction."""
        self.notifier.reloading()
        started = time.monotonic()
        try:
            config = self._load()
            for key in RESTART_KEYS:
                if getattr(config, key) != getattr(self.config, key):
                    raise ConfigError(f"{OPTIONS_BY_KEY[key].flag} (key {key!r}) cannot change on reload: "
                                      f"restart the agent")
            ruleset = render(config, self._facts(config))
            if self.applied is None or ruleset != self.applied.ruleset:
                self._install(ruleset, "reload")
            else:
                self.ruleset = ruleset
        except InterceptdError as exc:
            # Nothing was applied (a refused transaction changes nothing): the running ruleset stays.
            with self.state.lock:
                self.state.reloads["error"] += 1
                self.state.last_reload_successful = False
                self.state.last_error = str(exc)
            self._event("error", "reload", started, [], str(exc))
            self.notifier.ready(self.status_line())
            return False
        self.retry_at = None
        self.backoff.reset()
        self._reconfigure(config)
        with self.state.lock:
            self.state.reloads["success"] += 1
            self.state.last_reload_successful = True
            self.state.last_reload_success_ts = time.time()
            self.state.mode = config.inbound_interception_mode
        self._event("info", "reload", started, [])
        self.notifier.ready(self.status_line())
        return True

    def kernel_matches(self) -> bool:
        """For /readyz, from any thread: does the kernel hold our ruleset now? Drift wakes the loop to repair."""
        if self.retry_at is not None:
            return False
        try:
            with self._kernel_lock:
                if self.applied is None:
                    return False
                drift = reconcile.check(self.kernel, self.router, self.applied)
        except KernelRefusedError:
            return False
        if drift:
            self._check_requested = True
            self._wake()
        return not drift

    def status_line(self) -> str:
        with self.state.lock:
            s = self.state
            health = "ready" if s.ready else f"NOT READY: {s.last_error}"
            return (f"table inet {s.table} generation {s.generation}: {health}; "
                    f"{sum(s.drift_repairs.values())} repairs, {sum(s.reloads.values())} reloads")

    # --- lifecycle ---

    def run(self) -> int:
        """Lock, apply, loop until SIGTERM/SIGINT; returns the exit code."""
        lock = Lock(self.config.state_dir, self.config.table)
        lock.acquire()
        try:  # before any change: a listener that cannot bind stops the start
            address = self.config.metrics_address
            metrics = MetricsServer(address, self.kernel, self.state).start() if address else None
        except ListenError:
            lock.release()
            raise
        restore_signals = catch_signals(self._wake_w, self._on_signal)
        try:
            self._set_events(self.config.kernel_events)  # before the first apply: no change goes unseen
            if self.config.own_table:  # the owner is this agent's libnftables context, for its lifetime
                flags = self.kernel.own(self.config.table)
                persist = "persist" in flags
                (self.log.info if persist else self.log.warning)("own-table", flags=list(flags),
                                                                 note="" if persist else NO_PERSIST)
            self.apply_desired("start")
            trim_heap()
            self._loop()
        finally:
            self.notifier.stopping()
            restore_signals()
            self._stop()
            if metrics is not None:
                metrics.stop()
            lock.release()
        return 0

    def _loop(self) -> None:
        next_check = time.monotonic() + self.config.reconcile_interval
        watchdog = self.notifier.watchdog_s
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if watchdog is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + watchdog / 2
            deadlines = [next_check, self.retry_at, next_ping if watchdog is not None else None]
            timeout = max(0.0, min(d for d in deadlines if d is not None) - now)
            event = False
            for key, _ in self._selector.select(timeout):
                if key.data == "wake":
                    self._drain_wake()
                elif self._events is not None:
                    event = self._events.read() or event
            if self._stop_requested:
                return
            worked = self._reload_requested
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            now = time.monotonic()
            if self.retry_at is not None:
                if now >= self.retry_at:
                    worked = True
                    self.apply_desired("retry")
                next_check = now + self.config.reconcile_interval
            elif event or self._check_requested or now >= next_check:
                worked = True
                self._check_requested = False
                self.check("timer" if now >= next_check and not event else "event")
                next_check = time.monotonic() + self.config.reconcile_interval
            if worked:
                trim_heap()

    def _stop(self) -> None:
        started = time.monotonic()
        error = None
        if self.config.cleanup_on_exit:
            try:
                install.remove(self.kernel, self.router, self.config.table)
            except KernelRefusedError as exc:
                error = str(exc)
        self.close()
        self._event("error" if error else "info", "stop", started, [], error,
                    removed=self.config.cleanup_on_exit and error is None)

    def close(self) -> None:
        """Release the loop's and the kernel events' descriptors; the rules are not touched.

        The node agent, which drives many agents from its own loop, closes one when its namespace goes.
        """
        self._set_events(False)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _reconfigure(self, config: Config) -> None:
        """Take over the agent settings of a reloaded configuration."""
        if (config.log_level, config.log_format) != (self.config.log_level, self.config.log_format):
            logs.configure(config.log_level, config.log_format)
            self.log = logs.get(table=config.table)  # a bound logger keeps the configuration it was made with
        self._set_events(config.kernel_events)
        self.config = config

    def _set_events(self, enabled: bool) -> None:
        if enabled and self._events is None:
            try:
                self._events = NftEvents(self.config.table)
            except OSError as exc:
                self.log.warning("kernel events unavailable; periodic checks only", error=str(exc))
            else:
                self._selector.register(self._events, selectors.EVENT_READ, "events")
        elif not enabled and self._events is not None:
            self._selector.unregister(self._events)
            self._events.close()
            self._events = None
        with self.state.lock:
            self.state.kernel_events = self._events is not None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only flags: the wake-up fd (set_wakeup_fd) makes the loop's select return to act on them.
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe means the loop is already due to wake
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _event(self, level: str, name: str, started: float, drift: list[str], error: str | None = None,
               **extra: object) -> None:
        """Every apply, repair, reload and failure: one event with the same fields."""
        with self.state.lock:
            generation = self.state.generation
        getattr(self.log, level)(name, generation=generation, duration_ms=_ms(started), drift=drift, error=error,
                                 **extra)
