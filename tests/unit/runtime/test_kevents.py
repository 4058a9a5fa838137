"""runtime.kevents.TableEvents, over a pipe as the event source: what the agent, each pod table and the host
probe table share (open and watch, note, close; a source that cannot be opened is periodic checks only)."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator

import pytest

from interceptd.config import options as config
from interceptd.control.controller import TableController
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import logs
from interceptd.runtime.kevents import EventSource, TableEvents
from interceptd.runtime.loop import EventLoop
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel, FakeRouter


class PipeEvents:
    """Readable when the test writes to the pipe; `relevant` says what read() reports."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK)
        self.relevant = True
        self.closed = False

    def fileno(self) -> int:
        return self.r

    def read(self) -> bool:
        os.read(self.r, 64)
        return self.relevant

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
        self.closed = True


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop(Notifier({}))
    yield loop
    loop.close()


def _controller() -> TableController:
    cfg = config.load({"service_cidr": "*"}, {})
    return TableController(cfg, kernel=FakeKernel(), router=FakeRouter(), facts=lambda _c: HostFacts(False, None),
                           load=lambda: cfg, log=logs.get(table=cfg.table))


def _turn(loop: EventLoop) -> None:
    """One wake-up of the loop (its first tick runs before it waits): ready callbacks run, the next tick stops it."""
    ticks = []

    def tick() -> float:
        ticks.append(1)
        loop.stop_requested = len(ticks) > 1
        return time.monotonic() + 5.0  # never waits forever, even if nothing is watched

    loop.stop_requested = False
    loop.run(tick, lambda: None)


def test_events_are_watched_noted_taken_and_closed(loop: EventLoop) -> None:
    controller, source = _controller(), PipeEvents()
    events = TableEvents(loop, lambda: source, controller)
    events.set(True)
    events.set(True)  # idempotent: one source
    assert events.source is source and controller.state.kernel_events
    os.write(source.w, b"x")
    _turn(loop)
    assert events.take() and not events.take()  # noted once, cleared by the taking
    source.relevant = False
    os.write(source.w, b"x")
    _turn(loop)
    assert not events.take()  # another table's event: drained, not noted
    events.set(False)
    assert source.closed and events.source is None and not controller.state.kernel_events


def test_a_source_that_cannot_be_opened_is_one_warning_and_periodic_checks(loop: EventLoop) -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        controller = _controller()

        def refuse() -> EventSource:
            raise OSError("no netlink here")

        events = TableEvents(loop, refuse, controller)
        events.set(True)
    finally:
        logs.configure("info", "json")
    assert events.source is None and not controller.state.kernel_events
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert "periodic checks only" in line["event"] and line["error"] == "no netlink here"
