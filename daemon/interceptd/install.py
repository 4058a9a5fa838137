"""Apply and remove a ruleset: read our table, build one transaction, hand it to the kernel.

Shared by `apply`, `cleanup`, the agent and the node daemon, so all of them install exactly alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import routes
from .kernel import Json, Kernel
from .model import Ruleset
from .nftjson import Existing, deletion, normalise, transaction


@dataclass(frozen=True)
class Applied:
    """What the kernel held right after our apply: the reference for drift detection."""

    ruleset: Ruleset
    listing: list[Json]  # normalised
    duration_s: float


def apply(kernel: Kernel, ruleset: Ruleset) -> Applied:
    started = time.monotonic()
    current = kernel.list_table(ruleset.table, ruleset.family)
    existing = Existing.empty() if current is None else Existing.from_listing(current)
    kernel.apply(transaction(ruleset, existing))
    # After the table: marked packets only need the routes once the tproxy rules exist.
    routes.sync(ruleset, routes.router_for(kernel))
    after = kernel.list_table(ruleset.table, ruleset.family) or []
    return Applied(ruleset, normalise(after), time.monotonic() - started)


def remove(kernel: Kernel, table: str, family: str = "inet") -> bool:
    """Delete interceptd's table and its TPROXY rules and routes; True if the table existed."""
    existed = kernel.list_table(table, family) is not None
    kernel.apply(deletion(table, family))
    routes.remove(routes.router_for(kernel))
    return existed
