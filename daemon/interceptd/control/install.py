"""Apply and remove a ruleset: read our table, build one transaction, hand it to the kernel.

Shared by `apply`, `cleanup`, the agent and the node daemon, so all of them install exactly alike. The
comparisons (drift, the read-back's parser and tablediff) are imported where they are used: a one-shot
`apply` never compares, and an init container pays for every module it imports.
"""

from __future__ import annotations

import time
from collections import defaultdict

from interceptd.errors import KernelRefusedError, ReadBackError, UnexplainableError
from interceptd.records import record
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import (
    Existing,
    Json,
    deletion,
    elements_json,
    normalise,
    same_elements,
    transaction,
    update,
)
from interceptd.system import routes
from interceptd.system.kernel import Kernel
from interceptd.system.routes import Router

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from typing import Any


@record
class Applied:
    """What the kernel held right after our apply: the reference for drift detection."""

    ruleset: Ruleset
    listing: list[Json]  # normalised
    duration_s: float


APPLY_ATTEMPTS = 5


def apply(kernel: Kernel, router: Router, ruleset: Ruleset, reference: bool = True,
          previous: Applied | None = None) -> Applied:
    """Install `ruleset`; the listing that becomes the drift reference must show it.

    TPROXY's policy rules and routes cannot join the table's transaction, so the order makes up for it:
    the new ruleset's rules and routes first, then the table that marks packets for them, then the ones
    no rule marks for any more. A process killed anywhere in between leaves the old table with its routes
    (plus unused new ones), or the new table with its routes (plus unused old ones); never a table whose
    marked packets find no route. Whatever is extra or missing, the next apply or start puts right:
    each step compares with the kernel, not with what the previous run meant to do. When the kernel
    refuses the first transaction, the rules and routes added for it are taken back.

    A one-shot `apply` keeps no reference (reference=False: no read-back, Applied.listing is empty).
    Another process can change the table between our transaction and the listing that follows it. Taken
    as the reference, that change would never count as drift (a flush right there left the pod
    uncaptured for good), so a listing that does not hold the ruleset means: apply again.

    `previous`: what the table held after our last apply. When the kernel still holds exactly that, the
    first transaction rewrites only the sets and rules that differ (nftjson.update: a live settings change
    leaves the rest of the table, and every counter, as it is); otherwise, or when the kernel refuses that
    update, the whole table is replaced.
    """
    started = time.monotonic()
    added = routes.add_missing(ruleset, router)
    for attempt in range(APPLY_ATTEMPTS):
        try:
            current = kernel.list_table(ruleset.table, ruleset.family)
            if not (attempt == 0 and _updated(kernel, previous, ruleset, current)):
                existing = Existing.empty() if current is None else Existing.from_listing(current)
                kernel.apply(transaction(ruleset, existing))
        except KernelRefusedError:
            if attempt == 0:  # no table of this ruleset took: a refused apply changes nothing, routes included
                routes.take_back(added, router)
            raise
        if not reference:
            routes.drop_stale(ruleset, router)
            return Applied(ruleset, [], time.monotonic() - started)
        after = kernel.list_table(ruleset.table, ruleset.family) or []
        if holds(ruleset, after):
            routes.drop_stale(ruleset, router)
            return Applied(ruleset, _share_elements(ruleset, normalise(after)), time.monotonic() - started)
    raise KernelRefusedError(f"table {ruleset.family} {ruleset.table} was changed by another process right after "
                             f"each of {APPLY_ATTEMPTS} applies")


def _updated(kernel: Kernel, previous: Applied | None, ruleset: Ruleset, current: list[Json] | None) -> bool:
    """Apply the update from `previous` to `ruleset` if the kernel holds exactly `previous` (no drift) now and
    the shapes allow one; False when the whole table is to be replaced instead (also when the kernel refused
    the update, say a rule's handle went meanwhile: a refused transaction changed nothing)."""
    if previous is None or current is None or not previous.listing:
        return False
    from interceptd.ruleset.drift import compare

    if compare(previous.listing, normalise(current)):
        return False
    document = update(previous.ruleset, ruleset, current)
    if document is None:
        return False
    try:
        if document["nftables"]:
            kernel.apply(document)
    except KernelRefusedError:
        return False
    return True


def verified(kernel: Kernel, ruleset: Ruleset, applied: Applied) -> Applied:
    """Read the table back and compare it, decision by decision, with the rendered ruleset (the comparison
    behind `diff`, ruleset.tablediff); the Applied whose reference is that read-back, or ReadBackError naming
    what differs. For the CNI plugin's ADD: a pod is reported set up only with exactly its rules."""
    from interceptd.ruleset.drift import summary
    from interceptd.ruleset.nftparse import parse_listing
    from interceptd.ruleset.tablediff import differences

    listing = kernel.list_table(ruleset.table, ruleset.family)
    where = f"table {ruleset.family} {ruleset.table} read back after the apply"
    try:
        installed = None if listing is None else parse_listing(ruleset.table, listing, ruleset.family)
    except UnexplainableError as exc:
        raise ReadBackError(f"{where} holds what interceptd never writes: {exc}") from None
    found = differences(ruleset, installed)
    if listing is None or found:
        raise ReadBackError(f"{where} differs from the rendered ruleset: {'; '.join(summary(found))}")
    return Applied(ruleset, _share_elements(ruleset, normalise(listing)), applied.duration_s)


def _share_elements(ruleset: Ruleset, listing: list[Json]) -> list[Json]:
    """The reference keeps, for each set the kernel lists exactly as rendered, the rendered element list
    itself instead of an equal copy: 10,000 elements are then held once, not twice, for the agent's life."""
    rendered = {s.name: elements_json(s.elements) for s in ruleset.sets}
    for item in listing:
        body = item.get("set")
        if body is not None and body.get("elem") == rendered.get(body["name"]):
            body["elem"] = rendered[body["name"]]
    return listing


def holds(ruleset: Ruleset, listing: list[Json]) -> bool:
    """Does the listing show exactly the ruleset's chains, each with its rules in order (by name: the
    kernel's spelling of expressions may differ), and its sets with exactly the rendered elements?"""
    chains: set[str] = set()
    rules: dict[str, list[str]] = defaultdict(list)
    sets: dict[str, list[Any]] = {}
    for item in listing:
        if "chain" in item:
            chains.add(item["chain"]["name"])
        elif "rule" in item:
            rules[item["rule"]["chain"]].append(item["rule"].get("comment", ""))
        elif "set" in item:
            sets[item["set"]["name"]] = item["set"].get("elem", [])
    return (chains == {c.name for c in ruleset.chains}
            and all(rules.get(c.name, []) == [r.name for r in c.rules] for c in ruleset.chains)
            and all(s.name in sets and same_elements(sets[s.name], elements_json(s.elements)) for s in ruleset.sets))


def remove(kernel: Kernel, router: Router, table: str, family: str = "inet") -> bool:
    """Delete interceptd's table and its TPROXY rules and routes; True if the table existed."""
    existed = kernel.list_table(table, family) is not None
    kernel.apply(deletion(table, family))
    routes.remove(router)
    return existed
