"""One table's kernel events as the event loop watches them: the agent's table, each of the node's pod tables and
the node's host probe table all open, watch, note and close them the same way.

The descriptor is opened when kernel events are on (at start, or when a reload turns them on) and closed when
they go off or the table is no longer kept. A descriptor that cannot be opened is one warning and periodic
checks only, never a failed start. The callback only drains the descriptor and notes that something relevant
happened; the driver's tick takes the note and checks the table. Whether events are listened to is in the
table's state, for `status` and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from interceptd.control.controller import TableController
from interceptd.errors import InterceptdError
from interceptd.runtime.loop import EventLoop


class EventSource(Protocol):
    """system.events.NftEvents (or a fake): readable when our table or routes may have changed."""

    def fileno(self) -> int: ...
    def read(self) -> bool: ...
    def close(self) -> None: ...


class TableEvents:
    """The kernel events of the table `controller` keeps, watched by `loop` while enabled."""

    def __init__(self, loop: EventLoop, open_source: Callable[[], EventSource], controller: TableController) -> None:
        self._loop = loop
        self._open = open_source
        self._controller = controller
        self.source: EventSource | None = None
        self.seen = False  # a relevant event came since the tick last took the note

    def set(self, enabled: bool) -> None:
        """Open and watch, or unwatch and close (idempotent both ways)."""
        if enabled and self.source is None:
            try:
                self.source = self._open()
            except (OSError, InterceptdError) as exc:
                self._controller.log.warning("kernel events unavailable; periodic checks only", error=str(exc))
            else:
                self._loop.watch(self.source, self._on_ready)
        elif not enabled and self.source is not None:
            self._loop.unwatch(self.source)
            self.source.close()
            self.source = None
        with self._controller.state.lock:
            self._controller.state.kernel_events = self.source is not None

    def take(self) -> bool:
        """Whether a relevant event came since the last call (the note is cleared)."""
        seen, self.seen = self.seen, False
        return seen

    def _on_ready(self) -> None:
        if self.source is not None and self.source.read():
            self.seen = True
