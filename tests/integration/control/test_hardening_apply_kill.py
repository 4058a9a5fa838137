"""`interceptd apply` in TPROXY mode killed (SIGKILL) at random moments: the namespace is left with no
table, or a table with the policy rule and route its mark needs; the next apply always completes it.

The runs alternate between two marks and route tables, so each one after the first is a change of
mark: new rules and routes, the table, then the old ones deleted.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from typing import Any

from support.netlab import INTERCEPTD, Lab

RUNS = 60
CONFIGS = [(1401, 141), (1402, 142)]  # (mark, route table): unlike any uid, port or table number of the ruleset


def apply_command(lab: Lab, mark: int, table: int) -> list[str]:
    return ["ip", "netns", "exec", lab.pod, INTERCEPTD, "apply", "-m", "TPROXY", "-b", "*", "-t", str(mark),
            "-r", str(table)]


def table_marks(lab: Lab) -> set[int] | None:
    """The marks the installed table sets (its divert rules), or None without a table."""
    listed = subprocess.run(["ip", "netns", "exec", lab.pod, "nft", "-j", "list", "table", "inet", "interceptd"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        return None
    marks: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            mangle = node.get("mangle")
            if isinstance(mangle, dict) and mangle.get("key") == {"meta": {"key": "mark"}} \
                    and isinstance(mangle.get("value"), int):
                marks.add(mangle["value"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(json.loads(listed.stdout))
    return marks


def policy(lab: Lab) -> tuple[set[tuple[int, int]], set[int]]:
    """(fwmark, table) of the IPv4 policy rules, and the tables holding a `local default dev lo` route."""
    rules = json.loads(subprocess.run(["ip", "-n", lab.pod, "-j", "rule", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    found = {(int(r["fwmark"], 16), int(r["table"])) for r in rules if "fwmark" in r}
    routed = set()
    for _mark, table in CONFIGS:
        shown = subprocess.run(["ip", "-n", lab.pod, "-j", "route", "show", "table", str(table)],
                               capture_output=True, text=True)
        if shown.returncode == 0 and any(r.get("type") == "local" and r.get("dst") == "default"
                                         for r in json.loads(shown.stdout or "[]")):
            routed.add(table)
    return found, routed


def state(lab: Lab, mark: int) -> str:
    """'no table'; 'new table' or 'old table' when the table sets `mark` or the other one, and every mark it
    sets has its rule and route; 'incomplete' when one of them is missing."""
    marks = table_marks(lab)
    if marks is None:
        return "no table"
    rules, routed = policy(lab)
    wanted = {(m, table) for m, table in CONFIGS if m in marks}
    if not wanted or not wanted <= rules or not {t for _m, t in wanted} <= routed:
        return "incomplete"
    return "new table" if {m for m, _t in wanted} == {mark} else "old table"


def test_a_killed_apply_leaves_no_table_or_a_complete_one(lab: Lab) -> None:
    rng = random.Random()
    durations = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run(apply_command(lab, *CONFIGS[1]), check=True, capture_output=True)
        durations.append(time.monotonic() - started)
    duration = sorted(durations)[1]
    subprocess.run(["ip", "netns", "exec", lab.pod, INTERCEPTD, "cleanup"], check=True, capture_output=True)
    outcomes: Counter[str] = Counter()
    for run in range(RUNS):
        mark, table = CONFIGS[run % 2]
        proc = subprocess.Popen(apply_command(lab, mark, table), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # The first third of a run is the interpreter starting, before any change: most kills land later.
        time.sleep(rng.uniform(0.3, 1.1) * duration)
        proc.send_signal(signal.SIGKILL)
        killed = proc.wait() == -signal.SIGKILL
        found = state(lab, mark)
        outcomes[f"{found} ({'killed' if killed else 'finished'})"] += 1
        assert found != "incomplete", f"run {run}: the table sets a mark whose rule or route is missing"
        subprocess.run(apply_command(lab, mark, table), check=True, capture_output=True)  # the next apply
        assert state(lab, mark) == "new table"
        rules, routed = policy(lab)
        assert rules == {(mark, table)} and routed == {table}, "the next apply leaves exactly the new ones"
    print(f"\n{RUNS} applies ({duration:.2f} s each) killed after {0.3 * duration:.2f}-{1.1 * duration:.2f} s: "
          f"{dict(sorted(outcomes.items()))}")
    # Which step a kill hits is chance (tests/unit/control/test_install_kill.py stops an apply after each
    # one in turn); here the kills must at least have hit applies under way.
    assert outcomes["old table (killed)"] > 0, "no kill hit an apply under way"
