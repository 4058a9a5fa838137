"""The rule model: what interceptd wants in its table, independent of how nftables spells it.

Every rule has a stable name, unique in its chain; the name is the rule's nft comment, the suffix of its
named counter ("<chain>/<rule>"), its metric label and what `status` and `explain` show. A rule with no
actions only counts: each chain starts with one, named "entry", which is the chain's traffic counter.
"""

from __future__ import annotations

from interceptd.config.values import IPNetwork, PortRange
from interceptd.records import record
from interceptd.ruleset.names import counter_name

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from typing import Literal

    # Fields a match can test, spelled as nft spells them.
    InterfaceKey = Literal["iifname", "oifname"]
    OwnerKey = Literal["skuid", "skgid"]
    PortKey = Literal["tcp dport", "udp dport", "udp sport", "th dport"]
    AddressField = Literal["saddr", "daddr"]
_INTERFACE_KEYS: tuple[InterfaceKey, ...] = ("iifname", "oifname")  # every value of each Literal
_OWNER_KEYS: tuple[OwnerKey, ...] = ("skuid", "skgid")
_PORT_KEYS: tuple[PortKey, ...] = ("tcp dport", "udp dport", "udp sport", "th dport")
META_KEYS = (*_INTERFACE_KEYS, "l4proto", "nfproto", *_OWNER_KEYS, "mark")
PAYLOAD_KEYS = (*_PORT_KEYS, "ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr")
CT_KEYS = ("ct mark", "ct state")

Scalar = int | str | IPNetwork | PortRange


@record
class SetRef:
    """A lookup in one of the table's named sets."""

    name: str


Value = Scalar | SetRef | tuple[Scalar, ...]  # a tuple is an anonymous set


@record
class Match:
    """One test of a packet field. Build matches with the typed constructors below, which tie each key to the
    values it can take: mypy then checks every match the renderer writes."""

    key: str
    value: Value
    negate: bool = False
    mask: int | None = None  # `meta mark & mask == value`: only these bits are compared


def protocol(*names: str) -> Match:
    """`meta l4proto tcp`, or `meta l4proto { tcp, udp }` for several."""
    return Match("l4proto", names[0] if len(names) == 1 else names)


def nfproto(name: Literal["ipv4", "ipv6"]) -> Match:
    return Match("nfproto", name)


def interface(key: InterfaceKey, value: str | SetRef, negate: bool = False) -> Match:
    return Match(key, value, negate)


def owner(key: OwnerKey, ref: SetRef | int, negate: bool = False) -> Match:
    """The socket's owner is (not) one of the set's ids, or the one id; fails on packets without a local socket."""
    return Match(key, ref, negate)


def port(key: PortKey, value: int | SetRef | tuple[int, ...], negate: bool = False) -> Match:
    return Match(key, value, negate)


def address(version: int, fld: AddressField, value: IPNetwork | SetRef, negate: bool = False) -> Match:
    """`ip daddr` for IPv4, `ip6 daddr` for IPv6: the version picks the header."""
    return Match(f"{'ip' if version == 4 else 'ip6'} {fld}", value, negate)


def mark(value: int, negate: bool = False, mask: int | None = None) -> Match:
    return Match("mark", value, negate, mask)


def ct_mark(value: int, mask: int | None = None) -> Match:
    return Match("ct mark", value, mask=mask)


def ct_state(*states: str) -> Match:
    """Any of the conntrack states (a bit mask test)."""
    return Match("ct state", states[0] if len(states) == 1 else states)


@record
class Jump:
    chain: str


@record
class Return:
    pass


@record
class Accept:
    pass


@record
class Drop:
    pass


@record
class Redirect:
    port: int


@record
class TProxy:
    family: str  # "ip" or "ip6"
    port: int


@record
class Snat:
    """`snat ip to ADDRESS` (nat postrouting): the connection leaves with this source address."""

    family: str  # "ip" or "ip6"
    address: str


@record
class SetMark:
    mark: int


@record
class MarkFromCtMark:
    pass


@record
class CtMarkFromMark:
    pass


@record
class SetCtZone:
    zone: int


MARK_BITS = 0xFFFFFFFF  # packet and conntrack marks are 32 bits: `& ~mask` is `& (MARK_BITS & ~mask)`


@record
class SetCtMarkBits:
    """`ct mark set ct mark & ~mask | bits`: only the masked bits of the conntrack mark change, so marks other
    software keeps in the remaining bits survive (ambient's connmark)."""

    bits: int
    mask: int


Action = (Jump | Return | Accept | Drop | Redirect | TProxy | Snat | SetMark | MarkFromCtMark | CtMarkFromMark
          | SetCtZone | SetCtMarkBits)
VERDICTS = (Jump, Return, Accept, Drop, Redirect, TProxy, Snat)


@record
class Rule:
    name: str
    matches: tuple[Match, ...] = ()
    actions: tuple[Action, ...] = ()
    why: str = ""  # one line on what the rule means, for status --explain-top and explain

    @property
    def decides(self) -> bool:
        return bool(self.actions)


@record
class Hook:
    type: str  # nat, filter, route
    hook: str  # prerouting, output
    priority: int


@record
class Chain:
    name: str
    rules: tuple[Rule, ...]
    hook: Hook | None = None


@record
class NamedSet:
    name: str
    type: str  # ipv4_addr, ipv6_addr, inet_service, ifname, uid, gid
    elements: tuple[Scalar, ...]
    interval: bool = False


@record
class Ruleset:
    table: str
    chains: tuple[Chain, ...]
    sets: tuple[NamedSet, ...] = ()
    family: str = "inet"
    routes: tuple[PolicyRoute, ...] = ()
    lo_addresses: tuple[str, ...] = ()  # IPv6 addresses put on lo (Istio's ::6 passthrough source)

    def chain(self, name: str) -> Chain:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise KeyError(name)

    def set(self, name: str) -> NamedSet:
        for nset in self.sets:
            if nset.name == name:
                return nset
        raise KeyError(name)

    def counter_names(self) -> list[str]:
        return [counter_name(chain.name, rule.name) for chain in self.chains for rule in chain.rules]


@record(order=True)
class PolicyRoute:
    """TPROXY's policy routing: packets marked `mark` look up `table`, whose default route is local."""

    family: int  # 4 or 6
    mark: int
    table: int
    mask: int = MARK_BITS  # the mark bits the rule compares (ambient: 0xfff)

