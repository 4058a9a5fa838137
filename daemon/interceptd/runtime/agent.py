"""The agent (`interceptd run`): one table controller, driven by the event loop, until told to stop.

agent = loop + lock + one controller + metrics. The controller (control.controller) does every step on the
table; this module only decides when: at start, when the namespace's kernel events say our table or routes
changed, at each periodic check, when a retry is due, when /readyz saw drift, and on SIGHUP. It also speaks
to systemd (READY, RELOADING, STATUS, WATCHDOG, STOPPING) and gives the heap back after each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from interceptd.config import Config
from interceptd.control.controller import TableController, capture_mode
from interceptd.errors import InterceptdError, KernelSideError, ListenError
from interceptd.ruleset.doctor import CONFLICT_KINDS, Finding
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import logs
from interceptd.runtime.kevents import TableEvents
from interceptd.runtime.lockfile import Lock
from interceptd.runtime.loop import EventLoop, trim_heap
from interceptd.runtime.metrics import MetricsServer
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import host
from interceptd.system.events import NftEvents
from interceptd.system.fds import raise_nofile_limit
from interceptd.system.kernel import Kernel, NftKernel
from interceptd.system.routes import Netlink, Router

DOCTOR_EVERY = 10  # periodic checks between two runs of doctor's checks (a look around, never during a repair)
NO_PERSIST = ("libnftables or the kernel cannot set the persist flag: the owned table goes away when this agent "
              "exits (stop, crash or restart), and traffic is not captured until the next start")


class Agent:
    def __init__(self, config: Config, load: Callable[[], Config], kernel: Kernel | None = None,
                 facts: Callable[[Config], HostFacts] | None = None, notifier: Notifier | None = None,
                 router: Router | None = None, config_path: str | None = None,
                 look_around: Callable[[Config, Kernel], list[Finding]] | None = None) -> None:
        """`load` re-reads the configuration (file and environment) for SIGHUP; `facts` reads the host;
        `look_around` runs doctor's checks periodically (`interceptd run` gives `doctor_checks`; they read the
        real namespace, so an agent built without it, as in unit tests, does not look)."""
        self.notifier = notifier or Notifier()
        self.loop = EventLoop(self.notifier)
        self.controller = TableController(
            config, kernel=NftKernel() if kernel is None else kernel, router=Netlink() if router is None else router,
            facts=facts or host.detect, load=load, log=logs.get(table=config.table), on_drift=self._drift_seen)
        self.events = TableEvents(self.loop, lambda: NftEvents(self.config.table), self.controller)
        self._check_requested = False
        self._next_check = 0.0
        self._started = False
        self._config_path = config_path
        self._look_around = look_around
        self._doctor_in = 1  # timer checks until the next look around: the first one looks
        self._conflicts_logged: set[tuple[str, str]] = set()

    @property
    def config(self) -> Config:
        return self.controller.config

    # --- lifecycle ---

    def run(self) -> int:
        """Lock, apply, loop until SIGTERM/SIGINT; returns the exit code."""
        raise_nofile_limit()  # descriptors of clients and events live above 1024, away from libnftables
        lock = Lock(self.config.state_dir, self.config.table)
        lock.acquire()
        try:  # before any change: a listener that cannot bind stops the start
            address = self.config.metrics_address
            metrics = (MetricsServer(address, self.controller.kernel, self.controller.state).start()
                       if address else None)
        except ListenError:
            lock.release()
            raise
        try:
            self.events.set(self.config.kernel_events)  # before the first apply: no change goes unseen
            if self.config.own_table:  # the owner is this agent's libnftables context, for its lifetime
                flags = self.controller.kernel.own(self.config.table)
                persist = "persist" in flags
                log = self.controller.log
                (log.info if persist else log.warning)("own-table", flags=list(flags),
                                                       note="" if persist else NO_PERSIST)
            self.loop.run(self.tick, self.reload)
        finally:
            self.notifier.stopping()
            self._stop()
            if metrics is not None:
                metrics.stop()
            lock.release()
        return 0

    def tick(self) -> float:
        """One turn of the loop: start, retry, or check when due; returns the next deadline."""
        c = self.controller
        now = time.monotonic()
        worked = True
        if not self._started:
            self._started = True
            address = self.config.metrics_address
            self.apply("start", {"mode": capture_mode(self.config), "config": self._config_path or "",
                                 "metrics_address": f"{address[0]}:{address[1]}" if address else ""})
            self._next_check = time.monotonic() + self.config.reconcile_interval
        elif c.retry_at is not None:
            if c.retry_due(now):
                self.apply("retry")
            else:
                worked = False
            self._next_check = now + self.config.reconcile_interval
        elif self.events.seen or self._check_requested or now >= self._next_check:
            trigger = "timer" if not self.events.take() and now >= self._next_check else "event"
            self._check_requested = False
            if c.check(trigger) or not c.ready():  # systemd hears of repairs and failures, not of quiet checks
                self.notifier.status(c.status_line())
            elif trigger == "timer" and self._look_around is not None:
                self._doctor_in -= 1
                if self._doctor_in <= 0:
                    self._doctor_in = DOCTOR_EVERY
                    self.look_around()
            self._next_check = time.monotonic() + self.config.reconcile_interval
        else:
            worked = False
        if worked:
            trim_heap()
        return self._next_check if c.retry_at is None else c.retry_at

    def apply(self, trigger: str, context: dict[str, str] | None = None) -> bool:
        """Install the desired ruleset; the first success tells systemd READY=1."""
        first = self.controller.applied is None
        ok = self.controller.apply_desired(trigger, context=context)
        if ok and first:
            self.notifier.ready(self.controller.status_line())
        else:
            self.notifier.status(self.controller.status_line())
        return ok

    def look_around(self) -> None:
        """doctor's checks, after a quiet timer check: export what they find, log each new conflict once."""
        if self._look_around is None:
            return
        try:
            findings = self._look_around(self.config, self.controller.kernel)
        except InterceptdError as exc:
            self.controller.log.warning("doctor-failed", error=str(exc))
            return
        found = {f.check: list(f.culprits or (f.verdict,)) for f in findings
                 if not f.ok and f.check in CONFLICT_KINDS}
        seen = {(kind, culprit) for kind, culprits in found.items() for culprit in culprits}
        for kind, culprit in sorted(seen - self._conflicts_logged):
            self.controller.log.warning("conflict", kind=kind, culprit=culprit)
        self._conflicts_logged = seen  # one that goes and comes back is news again
        with self.controller.state.lock:
            self.controller.state.conflicts = found

    def reload(self) -> bool:
        """SIGHUP: the controller renders and swaps in the new configuration, or keeps the running one."""
        self.notifier.reloading()
        before = self.config
        config = self.controller.reload()
        if config is not None:
            if (config.log_level, config.log_format) != (before.log_level, before.log_format):
                logs.configure(config.log_level, config.log_format)
                self.controller.log = logs.get(table=config.table)  # a bound logger keeps its configuration
            self.events.set(config.kernel_events)
        self.notifier.ready(self.controller.status_line())
        trim_heap()
        return config is not None

    def _stop(self) -> None:
        started = time.monotonic()
        error = None
        if self.config.cleanup_on_exit:
            try:
                self.controller.remove()
            except KernelSideError as exc:
                error = str(exc)
        self.close()
        self.controller.event("error" if error else "info", "stop", started, [], error,
                              removed=self.config.cleanup_on_exit and error is None)

    def close(self) -> None:
        """Release the loop's and the kernel events' descriptors; the rules are not touched."""
        self.events.set(False)
        self.loop.close()

    # --- what wakes the loop ---

    def _drift_seen(self) -> None:
        """/readyz (another thread) saw drift: check and repair now."""
        self._check_requested = True
        self.loop.wake()


def doctor_checks(config: Config, kernel: Kernel) -> list[Finding]:
    """`interceptd doctor`'s checks against the agent's own configuration (imported only when they run)."""
    from interceptd.control import doctor

    return list(doctor.run(config, kernel).findings)
