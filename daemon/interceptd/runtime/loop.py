"""The one event loop of `interceptd run` and `interceptd node`: a selector, a wake-up pipe, signal flags, the
systemd watchdog and deadlines, in one thread.

Signal handlers only set a flag (the interpreter's wake-up fd makes select return), so a burst of SIGHUPs
collapses into one reload and nothing runs while another step is half done. Readiness callbacks only drain
their descriptor and note what happened; the work itself runs in the driver's `tick`, once per wake-up, which
returns its next deadline. Other threads (the metrics endpoint) ask for work with `wake()`.

Every descriptor the loop owns is moved above FD_SETSIZE (system.fds): the low range stays free for
libnftables, which cannot use a higher one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import selectors
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fds import move_high

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


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


class FileLike(Protocol):
    def fileno(self) -> int: ...


class EventLoop:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._selector = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = move_high(wake_r), move_high(wake_w)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.stop_requested = False
        self.reload_requested = False

    def watch(self, fileobj: FileLike, on_ready: Callable[[], None]) -> None:
        """Call `on_ready` (in the loop's thread) whenever `fileobj` is readable."""
        self._selector.register(fileobj, selectors.EVENT_READ, on_ready)

    def unwatch(self, fileobj: FileLike) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fileobj)

    def wake(self) -> None:
        """From any thread: make the loop run its tick now."""
        # A full pipe means the loop is already due to wake; a closed one (-1: EBADF) that it has stopped.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def run(self, tick: Callable[[], float | None], reload: Callable[[], object]) -> None:
        """Until SIGTERM or SIGINT: wait for a descriptor, a signal, a wake-up or the deadline `tick` returned;
        then reload on SIGHUP and run `tick` (its deadline: an absolute time.monotonic(), or None)."""
        restore = self._catch_signals()
        try:
            deadline = tick()
            next_ping = time.monotonic()
            watchdog = self.notifier.watchdog_s
            while not self.stop_requested:
                now = time.monotonic()
                if watchdog is not None and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + watchdog / 2
                due = [d for d in (deadline, next_ping if watchdog is not None else None) if d is not None]
                timeout = max(0.0, min(due) - now) if due else None
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        key.data()
                if self.stop_requested:
                    return
                if self.reload_requested:
                    self.reload_requested = False
                    reload()
                deadline = tick()
        finally:
            restore()

    def close(self) -> None:
        """Release the loop's descriptors (idempotent)."""
        if self._wake_r < 0:
            return
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _catch_signals(self) -> Callable[[], None]:
        """Route SIGHUP/SIGTERM/SIGINT to flags, wake through the pipe; returns what puts the old ones back."""
        previous_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

        def restore() -> None:
            signal.set_wakeup_fd(previous_fd)
            for sig, old in previous.items():
                signal.signal(sig, old)
        return restore

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
