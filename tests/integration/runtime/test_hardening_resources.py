"""Resource soak, short: repairs and scrapes side by side leave the agent's descriptors and threads flat.

`make soak` runs 100,000 operations and reports the slopes (tests/soak.py); RSS is only reported, since a
few thousand operations cannot tell allocator noise from a leak.
"""

from __future__ import annotations

import json
from pathlib import Path

from support.gaplab import churn
from support.netlab import Lab


def test_descriptors_and_threads_stay_flat(lab: Lab, tmp_path: Path) -> None:
    figures = churn(lab, tmp_path, ops=2000, every=500)
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}))
    warm = [values for _ops, values in figures["samples"][1:]]
    assert figures["reloads"] == 1000  # each one an apply: the two configurations alternate
    # A sample can catch one short-lived descriptor (a scrape's connection, a netlink dump socket); a leak
    # of one per operation would add hundreds between samples.
    fds = [fd for _rss, fd, _threads in warm]
    assert max(fds) - min(fds) <= 1 and fds[-1] <= fds[0] + 1, figures["samples"]
    assert {threads for _rss, _fds, threads in warm} == {warm[0][2]}, figures["samples"]
