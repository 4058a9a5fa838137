"""Kernel state outside the nft table: TPROXY's policy routing and the ::6 passthrough address
(docs/istio-compatibility.md, "TPROXY" and "IPv6 and dual-stack").

Every `ip rule` and route interceptd installs carries ROUTE_PROTOCOL, so a re-apply and `cleanup` find
exactly what interceptd put there, whatever configuration installed it, and never touch anyone else's.
`add_missing` and `drop_stale` are idempotent; a change runs the first before the table and the second after.
"""

from __future__ import annotations

import errno

from interceptd.errors import RoutingError
from interceptd.records import record
from interceptd.ruleset.model import MARK_BITS, Ruleset
from interceptd.system import rtnl

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Iterable
    from contextlib import AbstractContextManager
    from typing import Literal, Protocol
else:
    Protocol = object  # Router is a plain class at run time, a protocol for mypy

ROUTE_PROTOCOL = 245  # "proto 245" in `ip rule` / `ip route`: unassigned in iproute2's rt_protos
RULE_PRIORITY = 32765  # what the kernel picks for Istio's `ip rule add` in a fresh namespace
RT_SCOPE_HOST = 254
_FAMILY = {4: rtnl.AF_INET, 6: rtnl.AF_INET6}


@record(order=True)
class Entry:
    """One kernel object interceptd owns: a fwmark rule, a `local default dev lo` route, or an address on lo."""

    kind: Literal["address", "route", "rule"]
    family: int  # 4 or 6
    table: int = 0  # rule, route
    mark: int = 0  # rule
    address: str = ""  # address
    mask: int = MARK_BITS  # rule: the mark bits compared (ambient's fwmark 0x111/0xfff)

    def __str__(self) -> str:
        ip = "ip" if self.family == 4 else "ip -6"
        if self.kind == "rule":
            mask = "" if self.mask == MARK_BITS else f"/{self.mask:#x}"
            return f"{ip} rule fwmark {self.mark}{mask} lookup {self.table}"
        if self.kind == "route":
            return f"{ip} route local default dev lo table {self.table}"
        return f"{ip} address {self.address} dev lo"


class Router(Protocol):
    def owned(self) -> set[Entry]:
        """Every rule and route carrying ROUTE_PROTOCOL, and the wanted-kind addresses present on lo."""

    def add(self, entry: Entry) -> None:
        """Install the entry; already present is fine."""

    def delete(self, entry: Entry) -> None:
        """Remove the entry; already gone is fine."""


class NoRoutes:
    """The Router of a table that needs no policy routes, in a namespace whose routes are not interceptd's to
    keep (the node's own, for the host probe table): it owns nothing, so nothing is ever added or removed."""

    def owned(self) -> set[Entry]:
        return set()

    def add(self, entry: Entry) -> None:
        raise RoutingError(f"`{entry}`: policy routes are never written in this namespace")

    def delete(self, entry: Entry) -> None:
        raise RoutingError(f"`{entry}`: policy routes are never written in this namespace")


def wanted(ruleset: Ruleset) -> set[Entry]:
    out: set[Entry] = {Entry("address", 6, address=a) for a in ruleset.lo_addresses}
    for pr in ruleset.routes:
        out.add(Entry("rule", pr.family, pr.table, pr.mark, mask=pr.mask))
        out.add(Entry("route", pr.family, pr.table))
    return out


def add_missing(ruleset: Ruleset, router: Router) -> list[Entry]:
    """Install what the ruleset needs and the kernel lacks (returned); the first half of a change, done
    before the table that marks packets, so no marked packet ever finds its rule or route missing.

    Routes go in before the rules that look them up: a rule is never there without its route, even when a
    kill stops us in between. Addresses are only ever added: ::6 may carry the proxy's live passthrough
    connections, and Istio never removes it either.
    """
    added = sorted(wanted(ruleset) - router.owned())
    for entry in added:
        router.add(entry)
    return added


def take_back(added: list[Entry], router: Router) -> None:
    """Delete the rules and routes add_missing just added (newest first), when the table they were for was
    refused; addresses stay, as everywhere."""
    for entry in reversed(added):
        if entry.kind != "address":
            router.delete(entry)


def drop_stale(ruleset: Ruleset, router: Router) -> None:
    """Delete the rules and routes the ruleset no longer needs; the second half, done after the table that
    stopped setting their marks. Rules go before their routes (the reverse of add_missing)."""
    for entry in sorted(router.owned() - wanted(ruleset), reverse=True):
        if entry.kind != "address":
            router.delete(entry)


def missing(ruleset: Ruleset, router: Router) -> list[str]:
    """What the ruleset needs but the kernel lacks, for the agent's drift check ([] = all present)."""
    return [str(e) for e in sorted(wanted(ruleset) - router.owned())]


def remove(router: Router) -> list[Entry]:
    """Delete every rule and route interceptd installed (cleanup); returns what was removed."""
    gone = sorted(e for e in router.owned() if e.kind != "address")
    for entry in gone:
        router.delete(entry)
    return gone


class Netlink:
    """The caller's network namespace, or the one at `netns` (a namespace file), over rtnetlink (rtnl)."""

    def __init__(self, addresses: Iterable[str] = ("::6",), netns: str = "") -> None:
        self._addresses = tuple(addresses)  # which addresses on lo `owned` reports
        self._netns = netns

    def owned(self) -> set[Entry]:
        try:
            return self._owned()
        except OSError as exc:  # a kernel-side failure like any other: the controller retries it
            raise RoutingError(f"cannot read the namespace's rules, routes and addresses: {exc.strerror}") from None

    def _owned(self) -> set[Entry]:
        out: set[Entry] = set()
        with self._entered():
            for version, fam in _FAMILY.items():
                for r in rtnl.rules(fam):
                    if r.protocol == ROUTE_PROTOCOL:
                        out.add(Entry("rule", version, r.table, r.fwmark, mask=r.fwmask))
                for r in rtnl.routes(fam):
                    if r.protocol == ROUTE_PROTOCOL:
                        out.add(Entry("route", version, r.table))
            lo = rtnl.if_nametoindex("lo")
            for a in rtnl.addresses(rtnl.AF_INET6):
                if a.index == lo and a.prefixlen == 128 and a.address in self._addresses:
                    out.add(Entry("address", 6, address=a.address))
        return out

    def _entered(self) -> AbstractContextManager[object]:
        if not self._netns:
            return _HERE
        from interceptd.system.netns import entered

        return entered(self._netns)

    def add(self, entry: Entry) -> None:
        self._call(True, entry, errno.EEXIST)

    def delete(self, entry: Entry) -> None:
        self._call(False, entry, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)

    def _call(self, add: bool, entry: Entry, *tolerated: int) -> None:
        fam = _FAMILY[entry.family]
        try:
            with self._entered():
                if entry.kind == "rule":
                    rtnl.change_rule(add, fam, entry.mark, entry.table, RULE_PRIORITY, ROUTE_PROTOCOL, entry.mask)
                elif entry.kind == "route":
                    rtnl.change_local_route(add, fam, entry.table, _lo_index(), ROUTE_PROTOCOL, RT_SCOPE_HOST)
                else:
                    rtnl.change_address(add, _lo_index(), entry.address, 128)
        except OSError as exc:
            if exc.errno not in tolerated:
                raise RoutingError(f"cannot {'add' if add else 'delete'} `{entry}`: {exc.strerror}") from None


class _Here:
    """The caller's own namespace: nothing to enter (contextlib.nullcontext, which a one-shot apply does not
    import)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_HERE = _Here()


def _lo_index() -> int:
    try:
        return rtnl.if_nametoindex("lo")
    except OSError:
        raise RoutingError("the namespace has no loopback interface 'lo'") from None
