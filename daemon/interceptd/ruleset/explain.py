"""Pure evaluation of one connection's first packet on interceptd's rule model, the way netfilter walks it.

Why this exists: "why did (or didn't) my traffic go through the proxy?" is answered here from the same
Ruleset that is installed (rendered from the configuration, or parsed back from the kernel), not by
reading nft text. The walk follows the hooks a first packet meets:

* outbound (a local process connects): every `output` base chain in priority order (raw, mangle, nat);
  if the packet then leaves over `lo` (a local destination, or NATed to loopback), it comes back in on
  `lo` and meets the `prerouting` base chains except nat ones (the flow's NAT is already decided);
  a packet that leaves over another interface meets the `postrouting` base chains (the node's host probe
  table SNATs there);
* inbound (a packet arrives on an interface): every `prerouting` base chain in priority order.

Semantics kept from the kernel: a payload match (`tcp dport`, `ip daddr`) fails, negated or not, when the
packet has no such header; `meta skuid/skgid` fails on a packet without a local socket; `accept` and NAT
statements end the base chain only; `drop` ends everything; `redirect` in output sends to loopback, in
prerouting to the incoming interface's primary address; a first packet is in conntrack state `new`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from interceptd import records
from interceptd.config.values import PortRange, Prefix
from interceptd.ruleset.model import (
    MARK_BITS,
    Accept,
    Chain,
    CtMarkFromMark,
    Drop,
    Jump,
    MarkFromCtMark,
    Match,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Scalar,
    SetCtMarkBits,
    SetCtZone,
    SetMark,
    SetRef,
    Snat,
    TProxy,
)
from interceptd.ruleset.names import (
    ENTRY,
    ISTIO_IN_REDIRECT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    counter_name,
)
from interceptd.ruleset.nfttext import action_text

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from interceptd.ruleset.facts import IPAddress

# What a redirect into each of interceptd's chains means (the chain names are part of the model).
LISTENER_ROLE = {ISTIO_REDIRECT: "the proxy's outbound listener", ISTIO_IN_REDIRECT: "the proxy's inbound listener",
                 ISTIO_OUTPUT_DNS: "the DNS proxy", ISTIO_TPROXY: "the proxy's inbound listener"}
_SHOWN_ELEMENTS = 8
_FAMILY_WORD = {"ipv4": "IPv4", "ipv6": "IPv6"}
_KEY_WORD = {"skuid": "uid", "skgid": "gid", "l4proto": "protocol", "nfproto": "family", "mark": "packet mark"}


@dataclass(frozen=True)
class Connection:
    """A connection as its first packet looks to netfilter. uid/gid are the socket owner's (outbound only)."""

    direction: str  # "outbound" | "inbound"
    protocol: str  # "tcp" | "udp"
    dst: IPAddress
    dport: int
    src: IPAddress
    sport: int = 40000
    uid: int | None = None
    gid: int | None = None
    iif: str = ""  # inbound: the interface it arrives on
    oif: str = ""  # outbound: the interface the route picks ("lo" for local destinations)
    mark: int = 0  # outbound: the socket's SO_MARK (ambient's node proxy marks its own sockets)

    @property
    def family(self) -> int:
        return self.dst.version

    def describe(self) -> str:
        owner = f" uid {self.uid} gid {self.gid}" if self.direction == "outbound" else ""
        owner += f" mark {self.mark:#x}" if self.mark else ""
        dev = f" oif {self.oif}" if self.direction == "outbound" else f" iif {self.iif}"
        return (f"{self.direction} {self.protocol} {_hostport(self.src, self.sport)} -> "
                f"{_hostport(self.dst, self.dport)}{owner}{dev}")


@dataclass(frozen=True)
class Step:
    """One line of the walk: a hook, a chain entered, a rule tried, or the chain left."""

    kind: str  # "hook" | "chain" | "rule" | "leave"
    chain: str
    depth: int
    rule: str = ""
    matched: bool = False
    reason: str = ""  # why it matched or not: the facts tested
    action: str = ""  # what a matched rule did
    why: str = ""  # the rule's meaning (Rule.why)


@dataclass(frozen=True)
class Verdict:
    action: str  # "redirect" | "tproxy" | "snat" | "drop" | "none"
    address: str  # where the connection ends up ("127.0.0.1", "198.51.100.1", "primary address of eth0")
    port: int
    rule: str  # "<chain>/<rule>" that decided, "" when nothing did
    text: str


@dataclass(frozen=True)
class Explanation:
    connection: Connection
    steps: tuple[Step, ...]
    verdict: Verdict

    def matched(self) -> list[str]:
        """Counter names of every rule that matched, in order: what a kernel trace of our table reports."""
        return [counter_name(s.chain, s.rule) for s in self.steps if s.kind == "rule" and s.matched]


@dataclass
class _Packet:
    nfproto: str
    l4proto: str
    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: int
    iif: str
    oif: str
    uid: int | None  # None: no local socket (the match fails)
    gid: int | None
    mark: int = 0
    ctmark: int = 0
    zone: int | None = None


@dataclass
class _Outcome:
    """How one base chain ended, and what the packet became."""

    nat: tuple[str, int] | None = None  # chain holding the redirect, port
    tproxy: tuple[str, int] | None = None
    snat: str = ""  # the new source address
    dropped: bool = False
    rule: str = ""
    steps: list[Step] = field(default_factory=list)


def _hostport(addr: IPAddress | str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _elements_text(values: tuple[Scalar, ...]) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOWN_ELEMENTS])
    more = f", ... ({len(values)} in all)" if len(values) > _SHOWN_ELEMENTS else ""
    return "{" + shown + more + "}"


def _contains(element: Scalar, value: object) -> bool:
    if isinstance(element, PortRange):
        return value in element
    if isinstance(element, Prefix):
        return value in element
    return element == value


class _Evaluator:
    def __init__(self, ruleset: Ruleset, tproxy_listening: bool) -> None:
        self.rs = ruleset
        self.tproxy_listening = tproxy_listening

    def _field(self, key: str, pkt: _Packet) -> tuple[object, str]:
        """The packet's value for a match key, or (None, why it has none)."""
        if key in ("iifname", "oifname"):
            return (pkt.iif if key == "iifname" else pkt.oif), ""
        if key in ("skuid", "skgid"):
            value = pkt.uid if key == "skuid" else pkt.gid
            return value, "" if value is not None else "the packet has no local socket (no owner to test)"
        simple = {"l4proto": pkt.l4proto, "nfproto": pkt.nfproto, "mark": pkt.mark, "ct mark": pkt.ctmark,
                  "ct state": "new"}
        if key in simple:
            return simple[key], ""
        proto, fld = key.split()
        if proto in ("ip", "ip6"):
            want = "ipv4" if proto == "ip" else "ipv6"
            if pkt.nfproto != want:
                return None, f"not an {_FAMILY_WORD[want]} packet ({key} does not apply)"
            return (pkt.saddr if fld == "saddr" else pkt.daddr), ""
        if proto in ("tcp", "udp") and pkt.l4proto != proto:
            return None, f"not a {proto.upper()} packet ({key} does not apply)"
        return (pkt.sport if fld == "sport" else pkt.dport), ""

    def _test(self, match: Match, pkt: _Packet) -> tuple[bool, str]:
        """Whether one match holds, and the fact that decided it, in words."""
        actual, missing = self._field(match.key, pkt)
        if actual is None:
            return False, missing
        word = _KEY_WORD.get(match.key, match.key)
        if match.mask is not None and isinstance(actual, int):
            same = (actual & match.mask) == match.value
            return same != match.negate, \
                f"{word} {actual:#x} & {match.mask:#x} is {'' if same else 'not '}{match.value:#x}"
        shown = actual if actual != "" else '""'
        value = match.value
        if isinstance(value, SetRef | tuple):
            if isinstance(value, SetRef):
                elements = self.rs.set(value.name).elements
                where = f"{value.name} {_elements_text(elements)}"
            else:
                elements = value
                where = _elements_text(elements)
            inside = any(_contains(e, actual) for e in elements)
            return inside != match.negate, f"{word} {shown} is {'' if inside else 'not '}in {where}"
        same = _contains(value, actual)
        if isinstance(value, Prefix) and value.prefixlen != value.max_prefixlen:
            return same != match.negate, f"{word} {shown} is {'' if same else 'not '}in {value}"
        shown_value = value.address if isinstance(value, Prefix) else value
        return same != match.negate, f"{word} {shown} is {'' if same else 'not '}{shown_value}"

    def run_base(self, chain: Chain, pkt: _Packet, hook: str) -> _Outcome:
        """Walk one base chain with its jumps; the packet's mark/zone are updated in place."""
        out = _Outcome()
        out.steps.append(Step("chain", chain.name, 1, reason=_hook_text(chain)))
        stack: list[tuple[Chain, int]] = []
        current, index = chain, 0
        while True:
            depth = len(stack) + 1
            if index >= len(current.rules):
                out.steps.append(Step("leave", current.name, depth, reason="end of chain"))
                if not stack:
                    return out
                current, index = stack.pop()
                continue
            rule = current.rules[index]
            index += 1
            ok, reason = self._rule_matches(rule, pkt)
            if not ok:
                out.steps.append(Step("rule", current.name, depth, rule.name, False, reason, why=rule.why))
                continue
            effect, done = self._act(rule, current, pkt, hook, out)
            if done == "break":
                out.steps.append(Step("rule", current.name, depth, rule.name, False, effect, why=rule.why))
                continue
            out.steps.append(Step("rule", current.name, depth, rule.name, True, reason, effect, rule.why))
            if done == "jump":
                target = next(a for a in rule.actions if isinstance(a, Jump)).chain
                stack.append((current, index))
                current, index = self.rs.chain(target), 0
                out.steps.append(Step("chain", current.name, depth + 1))
            elif done == "return":
                out.steps.append(Step("leave", current.name, depth, reason="return"))
                if not stack:
                    return out
                current, index = stack.pop()
            elif done == "stop":
                return out

    def _rule_matches(self, rule: Rule, pkt: _Packet) -> tuple[bool, str]:
        facts: list[str] = []
        for match in rule.matches:
            ok, fact = self._test(match, pkt)
            if not ok:
                return False, fact
            facts.append(fact)
        return True, ", ".join(facts)

    def _act(self, rule: Rule, chain: Chain, pkt: _Packet, hook: str, out: _Outcome) -> tuple[str, str]:
        """Apply the rule's statements; returns (what happened, "" | "jump" | "return" | "stop" | "break")."""
        words: list[str] = []
        for action in rule.actions:
            words.append(action_text(action))
            match action:
                case SetMark(mark):
                    pkt.mark = mark
                case MarkFromCtMark():
                    pkt.mark = pkt.ctmark
                case CtMarkFromMark():
                    pkt.ctmark = pkt.mark
                case SetCtZone(zone):
                    pkt.zone = zone if pkt.zone is None else pkt.zone  # the first zone set wins
                case SetCtMarkBits(bits, mask):
                    pkt.ctmark = (pkt.ctmark & MARK_BITS & ~mask) | bits
                case TProxy(_family, port) if not self.tproxy_listening:
                    return f"no transparent listener on :{port} (the tproxy statement does not match)", "break"
                case TProxy(_family, port):
                    out.tproxy, out.rule = (chain.name, port), counter_name(chain.name, rule.name)
                case Redirect(port):
                    out.nat, out.rule = (chain.name, port), counter_name(chain.name, rule.name)
                    if hook == "output":
                        pkt.daddr = ipaddress.ip_address("127.0.0.1" if pkt.nfproto == "ipv4" else "::1")
                        pkt.oif = "lo"
                    pkt.dport = port
                    return " ".join(words), "stop"
                case Snat(_family, address):
                    out.snat, out.rule = address, counter_name(chain.name, rule.name)
                    return " ".join(words), "stop"
                case Drop():
                    out.dropped, out.rule = True, counter_name(chain.name, rule.name)
                    return " ".join(words), "stop"
                case Accept():
                    return " ".join(words), "stop"
                case Jump():
                    return " ".join(words), "jump"
                case Return():
                    return " ".join(words), "return"
        return " ".join(words) or "counted", ""


def _hook_text(chain: Chain) -> str:
    assert chain.hook is not None
    return f"{chain.hook.type} {chain.hook.hook} priority {chain.hook.priority}"


def _base_chains(ruleset: Ruleset, hook: str, skip_nat: bool = False) -> list[Chain]:
    chains = [c for c in ruleset.chains if c.hook is not None and c.hook.hook == hook
              and not (skip_nat and c.hook.type == "nat")]
    return sorted(chains, key=lambda c: c.hook.priority if c.hook else 0)


def explain(ruleset: Ruleset, conn: Connection, tproxy_listening: bool = True) -> Explanation:
    """The path of the connection's first packet through the ruleset, and where the connection goes.

    `tproxy_listening`: whether a transparent listener waits on the TPROXY port (the kernel's tproxy
    statement matches only then); by default the proxy is assumed to be running.
    """
    if conn.src.version != conn.dst.version:
        raise ValueError("source and destination must be of the same address family")
    ev = _Evaluator(ruleset, tproxy_listening)
    outbound = conn.direction == "outbound"
    pkt = _Packet("ipv4" if conn.family == 4 else "ipv6", conn.protocol, conn.src, conn.dst, conn.sport,
                  conn.dport, "" if outbound else conn.iif, conn.oif if outbound else "",
                  conn.uid if outbound else None, conn.gid if outbound else None, conn.mark if outbound else 0)
    steps: list[Step] = []
    outcomes: list[_Outcome] = []
    phases = [("output", False)] if outbound else [("prerouting", False)]
    while phases:
        hook, skip_nat = phases.pop(0)
        steps.append(Step("hook", hook, 0, reason=_phase_text(hook, pkt)))
        for chain in _base_chains(ruleset, hook, skip_nat):
            outcome = ev.run_base(chain, pkt, hook)
            steps += outcome.steps
            outcomes.append(outcome)
            if outcome.dropped:
                break
        if not outbound or hook != "output" or (outcomes and outcomes[-1].dropped):
            continue
        if pkt.oif == "lo":
            # Looped back: the packet comes in on lo, without its socket; its NAT is already decided.
            pkt = replace(pkt, iif="lo", oif="", uid=None, gid=None)
            phases.append(("prerouting", True))
        elif _base_chains(ruleset, "postrouting"):
            phases.append(("postrouting", False))  # it leaves: its source NAT is decided on the way out
    return Explanation(conn, tuple(steps), _verdict(conn, outcomes, pkt))


def _phase_text(hook: str, pkt: _Packet) -> str:
    dev = f"oif {pkt.oif}" if hook in ("output", "postrouting") else f"iif {pkt.iif}"
    return f"{hook}: {pkt.l4proto} {_hostport(pkt.saddr, pkt.sport)} -> {_hostport(pkt.daddr, pkt.dport)} {dev}"


def _verdict(conn: Connection, outcomes: list[_Outcome], pkt: _Packet) -> Verdict:
    original = _hostport(conn.dst, conn.dport)
    for outcome in outcomes:
        if outcome.dropped:
            return Verdict("drop", str(conn.dst), conn.dport, outcome.rule, f"dropped by {outcome.rule}")
    tproxy = next((o for o in outcomes if o.tproxy), None)
    if tproxy is not None and tproxy.tproxy is not None:
        chain, port = tproxy.tproxy
        role = LISTENER_ROLE.get(chain, "a local transparent listener")
        return Verdict("tproxy", str(pkt.daddr), port, tproxy.rule,
                       f"delivered to {role} :{port} by TPROXY, original destination {original} kept on the "
                       f"socket (needs a transparent listener on :{port} and the fwmark route)")
    snat = next((o for o in outcomes if o.snat), None)
    if snat is not None:
        return Verdict("snat", snat.snat, conn.dport, snat.rule,
                       f"not intercepted: goes to {original} from {snat.snat} (source NAT by {snat.rule})")
    nat = next((o for o in outcomes if o.nat), None)
    if nat is not None and nat.nat is not None:
        chain, port = nat.nat
        role = LISTENER_ROLE.get(chain, "local port")
        where = str(pkt.daddr) if conn.direction == "outbound" else f"primary address of {conn.iif}"
        return Verdict("redirect", where, port, nat.rule,
                       f"redirected to {role} :{port} ({_hostport(where, port)}), original destination "
                       f"{original} kept for SO_ORIGINAL_DST")
    return Verdict("none", str(conn.dst), conn.dport, "",
                   f"not intercepted: goes directly to {original}")


def format_text(explanation: Explanation, all_rules: bool = False) -> str:
    """The path for humans: hooks, chains, deciding rules with why they (did not) match, the verdict."""
    lines = [explanation.connection.describe()]
    for s in explanation.steps:
        pad = "  " * s.depth
        if s.kind == "hook":
            lines.append(f"hook {s.reason}")
        elif s.kind == "chain":
            lines.append(f"{pad}chain {s.chain}" + (f" ({s.reason})" if s.reason else ""))
        elif s.kind == "leave":
            if all_rules:
                lines.append(f"{pad}  <- {s.reason}")
        elif s.rule != ENTRY or all_rules:
            mark = "MATCH" if s.matched else "no   "
            what = f" -> {s.action}" if s.matched else ""
            lines.append(f"{pad}  {mark} {s.rule}: {s.reason or 'always'}{what}")
            if s.matched and s.why:
                lines.append(f"{pad}        ({s.why})")
    lines.append(f"verdict: {explanation.verdict.text}")
    if explanation.verdict.rule:
        lines.append(f"decided by: {explanation.verdict.rule}")
    return "\n".join(lines)


def as_json(explanation: Explanation) -> dict[str, object]:
    c, v = explanation.connection, explanation.verdict
    return {
        "connection": {"direction": c.direction, "protocol": c.protocol, "src": str(c.src), "sport": c.sport,
                       "dst": str(c.dst), "dport": c.dport, "uid": c.uid, "gid": c.gid, "iif": c.iif,
                       "oif": c.oif, "mark": c.mark},
        "path": [{k: val for k, val in vars(s).items() if val not in ("", None)} for s in explanation.steps],
        "verdict": {"action": v.action, "address": v.address, "port": v.port, "rule": v.rule, "text": v.text},
        "matched": explanation.matched(),
    }


def borrow_why(parsed: Ruleset, reference: Ruleset) -> Ruleset:
    """Give kernel-parsed rules (which carry no `why`) the meaning of the same-named configured rule, when the
    two do the same thing."""
    chains = []
    for chain in parsed.chains:
        try:
            ref = {r.name: r for r in reference.chain(chain.name).rules}
        except KeyError:
            chains.append(chain)
            continue
        rules = tuple(records.replace(r, why=ref[r.name].why) if r.name in ref and ref[r.name].actions == r.actions
                      else r for r in chain.rules)
        chains.append(records.replace(chain, rules=rules))
    return records.replace(parsed, chains=tuple(chains))

