"""No interception gap: connections probed without pause through SIGHUP reloads and agent restarts
(SIGTERM, and SIGKILL in the middle of a reload's apply) are all captured; injected drift is repaired.

The short version runs in `make test`; `make soak` runs the full counts (tests/soak.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from support.gaplab import run_gap
from support.netlab import Lab


def test_no_bypass_through_reloads_and_restarts(lab: Lab, tmp_path: Path) -> None:
    report = run_gap(lab, tmp_path, reloads=40, restarts=4, drifts=20)
    figures = report.figures()
    print(json.dumps(figures, indent=1))
    for phase in ("reloads", "restarts"):
        for direction in ("outbound", "inbound"):
            row = figures[phase][direction]
            assert row["probed"] > 0, figures
            assert row["bypass"] == 0 and row["fail"] == 0, (phase, direction, figures)
    # Drift opens a window by nature (a connection caught in a `delete table` can even fail): what must
    # hold is that every drift was repaired. The windows are reported, and measured at length by `make soak`.
    assert figures["drift_repair_ms"]["n"] == 20
