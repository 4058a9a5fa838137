"""The host probe table: the one table interceptd keeps in the node's own network namespace (ambient mode).

Why it exists: an ambient pod captures all inbound TCP for the node proxy, except what comes from the probe
address (`probe-accept`). The kubelet's health probes come from the node itself, so on the node their source
is rewritten to that address: TCP from the kubelet's uid to an ambient pod's address leaves with source
--ambient-probe-address (IPv6: --ambient-probe-address-v6). The pods' addresses are two named sets, so a pod
coming or going changes set elements only, never the rule.

The table is kept like a pod's table (installed whole, repaired on drift); the node's pod changes go in as
nftjson.update's element changes.

The table is separate from the pods' table name (names.HOST_TABLE): nothing rendered for a pod can land in
the node's namespace, and `cleanup` of a pod's table never touches it.
"""

from __future__ import annotations

from collections.abc import Iterable

from interceptd.config import Config
from interceptd.config.values import Prefix
from interceptd.ruleset import names as N
from interceptd.ruleset.model import (
    Chain,
    Hook,
    NamedSet,
    Rule,
    Ruleset,
    SetRef,
    Snat,
    address,
    owner,
    protocol,
)

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from interceptd.ruleset.facts import IPAddress

POSTROUTING_HOOK = Hook("nat", "postrouting", 100)  # srcnat, as Istio's host rule


def render_host(config: Config, pods: Iterable[IPAddress]) -> Ruleset:
    """The host probe table for the node's ambient pods `pods` (their addresses, any order, duplicates ok)."""
    by_family: dict[int, set[IPAddress]] = {4: set(), 6: set()}
    for pod in pods:
        by_family[pod.version].add(pod)
    probe = {4: ("ip", config.ambient_probe_address.address), 6: ("ip6", config.ambient_probe_address_v6.address)}
    rules = [Rule(N.ENTRY)]
    sets = []
    for version in (4, 6):
        family, source = probe[version]
        name = N.SET_PROBE_PODS[version]
        sets.append(NamedSet(name, f"ipv{version}_addr",
                             tuple(Prefix.of(a) for a in sorted(by_family[version], key=int))))
        rules.append(Rule(
            N.per_family(N.RULE_PROBE_SNAT, version),
            (protocol("tcp"), owner("skuid", config.kubelet_uid), address(version, "daddr", SetRef(name))),
            (Snat(family, source),),
            f"the kubelet's probe of an ambient pod comes from {source}, which the pod's probe-accept lets through"))
    return Ruleset(N.HOST_TABLE, (Chain(N.POSTROUTING, tuple(rules), POSTROUTING_HOOK),), tuple(sets))
