"""Does the kernel still hold what was applied? The one place drift is decided (table and TPROXY routes).

A repair re-applies the whole table in one transaction; this module only decides and describes.
"""

from __future__ import annotations

from interceptd.control.install import Applied
from interceptd.ruleset.drift import Difference, compare
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import normalise
from interceptd.system import routes
from interceptd.system.kernel import Kernel
from interceptd.system.routes import Router


def check(kernel: Kernel, router: Router, applied: Applied) -> list[Difference]:
    """Every way the kernel differs from `applied`, most severe first; [] when it matches.

    The one place drift is decided: checks of other kernel state (TPROXY policy routes) belong here.
    """
    ruleset = applied.ruleset
    out = route_differences(ruleset, router)
    listing = kernel.list_table(ruleset.table, ruleset.family)
    if listing is None:
        return [Difference("table missing", f"table {ruleset.family} {ruleset.table} is missing"), *out]
    return sorted(out + compare(applied.listing, normalise(listing)), key=lambda d: d.rank)


def route_differences(ruleset: Ruleset, router: Router) -> list[Difference]:
    """The TPROXY policy rules, routes and lo addresses the ruleset needs and the kernel lacks (drift, `diff`)."""
    if not (ruleset.routes or ruleset.lo_addresses):
        return []
    return [Difference("routes missing", f"`{entry}` is missing") for entry in routes.missing(ruleset, router)]
