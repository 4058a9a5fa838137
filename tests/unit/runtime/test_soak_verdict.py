"""tests/soak.py's verdict: the figures of a run fail it on any bypass, a slow repair or a growing slope."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import soak

ROW = {"probed": 900, "bypass": 0, "fail": 0, "gaps": 0, "longest_gap_ms": 0.0, "longest_run": 0}
PASSING: dict[str, Any] = {
    "gap": {"connections": 5400, "reloads": {"outbound": dict(ROW), "inbound": dict(ROW)},
            "restarts": {"outbound": dict(ROW), "inbound": dict(ROW)},
            "drifts": {"outbound": {**ROW, "bypass": 7, "gaps": 3}, "inbound": dict(ROW)},
            "drift_repair_ms": {"n": 10, "median": 3.0, "p99": 9.0, "max": 12.0}},
    "resources": {"slope_per_10k_ops": {"rss_kib": 40.0, "fds": 0.0, "threads": 0.0}},
}


def with_change(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(PASSING)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_a_run_that_meets_every_goal_passes() -> None:
    assert soak.verdict(PASSING, drifts=10) == []  # bypasses while the table is deleted are drift's nature


@pytest.mark.parametrize(("path", "value", "words"), [
    (("gap", "reloads", "inbound", "bypass"), 1, "reloads inbound: 1 connections bypassed"),
    (("gap", "restarts", "outbound", "fail"), 2, "restarts outbound: 0 connections bypassed the proxy and 2 failed"),
    (("gap", "drifts", "inbound", "probed"), 0, "drifts inbound: no connection was probed"),
    (("gap", "drift_repair_ms", "p99"), 1200.0, "repair time p99 1200.0 ms (goal: at most 1000.0 ms)"),
    (("gap", "drift_repair_ms", "max"), 3500.0, "repair time max 3500.0 ms (goal: at most 3000.0 ms)"),
    (("gap", "drift_repair_ms", "n"), 9, "drifts: 9 of 10 were repaired"),
    (("resources", "slope_per_10k_ops", "fds"), 1.0, "fds grows by 1.0 per 10,000 operations (limit 0.5)"),
    (("resources", "slope_per_10k_ops", "rss_kib"), 2048.0, "rss_kib grows by 2048.0"),
    (("resources", "slope_per_10k_ops", "threads"), 1.0, "threads grows by 1.0"),
    (("resources", "slope_per_10k_ops"), {}, "too few samples"),
])
def test_each_missed_goal_fails_the_soak(path: tuple[str, ...], value: Any, words: str) -> None:
    failures = soak.verdict(with_change(path, value), drifts=10)
    assert len(failures) == 1 and words in failures[0], failures
