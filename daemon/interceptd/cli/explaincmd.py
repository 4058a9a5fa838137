"""`interceptd explain`: describe a connection on the command line, evaluate it, print the path and verdict.

The connection's missing facts (source address, interfaces, owner) are filled in from the current network
namespace the way the kernel would pick them, so `interceptd explain --dst 10.0.0.1:80` alone is a
complete question.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

from interceptd.config import OPTIONS_BY_KEY, Config
from interceptd.config.values import Prefix, parse_mark, parse_port, resolve_gid, resolve_uid
from interceptd.errors import ConfigError, HostError, KernelSideError, NotInstalledError
from interceptd.ruleset.explain import Connection, Explanation, as_json, borrow_why, explain, format_text
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.hostprobe import render_host
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.names import HOST_TABLE
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.render import render
from interceptd.ruleset.status import chain_stats
from interceptd.ruleset.tablediff import differences

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from interceptd.ruleset.facts import IPAddress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the connection to explain")
    way = g.add_mutually_exclusive_group()
    way.add_argument("--outbound", dest="direction", action="store_const", const="outbound",
                     help="a local process connects out (default)")
    way.add_argument("--inbound", dest="direction", action="store_const", const="inbound",
                     help="a connection arrives from outside the pod")
    g.add_argument("--protocol", choices=("tcp", "udp"), default="tcp", help="default: tcp")
    g.add_argument("--dst", metavar="ADDR:PORT", help="destination ([v6]:port for IPv6)")
    g.add_argument("--dst-addr", metavar="ADDR", help="destination address (instead of --dst)")
    g.add_argument("--dst-port", metavar="PORT", help="destination port (with --dst-addr)")
    g.add_argument("--src", metavar="ADDR[:PORT]", help="source (default: outbound, what the route picks; "
                   "inbound, a documentation address: any remote address decides alike)")
    g.add_argument("--uid", help="socket owner, name or number (outbound; default: yours)")
    g.add_argument("--gid", help="socket group, name or number (outbound; default: the --uid user's group, "
                   "else yours)")
    g.add_argument("--mark", help="outbound: the socket's SO_MARK, decimal or 0x-hex (ambient's node proxy: 0x539)")
    g.add_argument("--iif", help="inbound: arriving interface (default: the route back to the source)")
    g.add_argument("--oif", help="outbound: leaving interface (default: the route to the destination)")
    g.add_argument("--from-kernel", action="store_true",
                   help="explain the installed table even when capture flags or --config are given (without "
                        "them it is the default)")
    g.add_argument("--kernel", action="store_true",
                   help="also make a real probe connection, trace it in the kernel and compare")
    g.add_argument("--all-steps", action="store_true", help="also show counting rules and chain exits")
    g.add_argument("--json", action="store_true", help="machine-readable output")


def _address(text: str, flag: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ConfigError(f"{flag}: invalid address {text!r}") from None


def split_hostport(text: str, flag: str) -> tuple[IPAddress, int | None]:
    """`10.0.0.1:80`, `[2001:db8::1]:80`, or a bare address (then the port is None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ConfigError(f"{flag}: invalid address {text!r}")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    return _address(host, flag), _port(port, flag) if port is not None else None


def _port(text: str, flag: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: invalid value {text!r}: {exc}") from None


def _owner(text: str | None, resolve: Callable[[str], int], flag: str, default: int) -> int:
    if text is None:
        return default
    try:
        return resolve(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: invalid value {text!r}: {exc}") from None


def route(dst: IPAddress) -> tuple[str, IPAddress | None]:
    """The interface and preferred source the kernel's routing picks for `dst` in this namespace."""
    from interceptd.system import rtnl

    try:
        index, src = rtnl.route_get(str(dst))
        name = socket.if_indextoname(index)
    except OSError as exc:
        # Not bad input (exit 2): a fact about this namespace, said in words, not as an errno tuple.
        reason = os.strerror(exc.errno) if exc.errno else "no route"
        raise HostError(f"{dst}: this namespace has no route to it ({reason}); give --oif/--iif and --src") from None
    return name, ipaddress.ip_address(src) if src else None


REMOTE: dict[int, IPAddress] = {4: ipaddress.ip_address("198.51.100.1"), 6: ipaddress.ip_address("2001:db8:ffff::1")}


def primary_gid(uid: int) -> int:
    """--uid without --gid: the user's own group, as a process of that user would have (else the same number,
    the usual container convention), not the caller's group."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def connection(args: SimpleNamespace) -> Connection:
    direction = args.direction or "outbound"
    if args.dst:
        dst, dport = split_hostport(args.dst, "--dst")
    elif args.dst_addr:
        dst, dport = _address(args.dst_addr, "--dst-addr"), None
    else:
        raise ConfigError("--dst ADDR:PORT (or --dst-addr and --dst-port) is needed")
    if args.dst_port is not None:
        dport = _port(args.dst_port, "--dst-port")
    if dport is None:
        raise ConfigError("--dst: a destination port is needed (ADDR:PORT or --dst-port)")
    src, sport = split_hostport(args.src, "--src") if args.src else (None, None)
    if src is not None and src.version != dst.version:
        raise ConfigError(f"--src {args.src}: not the same address family as --dst {dst}")
    iif, oif = args.iif or "", args.oif or ""
    uid: int | None
    gid: int | None
    if direction == "outbound":
        routed, prefsrc = route(dst) if not (oif and src) else (oif, src)
        oif, src = oif or routed, src or prefsrc
        uid = _owner(args.uid, resolve_uid, "--uid", os.getuid())
        gid = _owner(args.gid, resolve_gid, "--gid", os.getgid() if args.uid is None else primary_gid(uid))
    else:
        # Which remote address does not change where an inbound connection goes: any will do.
        src = src or REMOTE[dst.version]
        iif = iif or route(src)[0]
        uid = gid = None
    if src is None:
        raise ConfigError(f"--dst {dst}: the route names no source address; give --src")
    return Connection(direction, args.protocol, dst, dport, src, sport or 40000, uid, gid, iif, oif,
                      _mark(args.mark))


def _mark(text: str | None) -> int:
    if text is None:
        return 0
    try:
        return parse_mark(text)
    except ValueError as exc:
        raise ConfigError(f"--mark: invalid value {text!r}: {exc}") from None


def proposing(args: SimpleNamespace) -> bool:
    """Capture flags or --config describe a proposed configuration; without them the installed table is the truth.
    interceptd's own settings (--table, --log-level, ...) propose nothing: they say where to look."""
    return args.config is not None or any(OPTIONS_BY_KEY[key].scope != "agent" for key in args.option_flags)


def installed(config: Config) -> Ruleset | None:
    """The table installed in this namespace, parsed back into the model (None when there is none)."""
    from interceptd.system.kernel import NftKernel

    listing = NftKernel().list_table(config.table)
    return None if listing is None else parse_listing(config.table, listing)


def desired(config: Config, current: Ruleset | None, facts: Callable[[], HostFacts]) -> Ruleset:
    """What `config` renders for its table. The node's host probe table is rendered as the host table, over the
    pods its installed sets hold (they are the node agent's state of the moment, not the configuration's);
    any other table is a pod's, over the namespace's facts."""
    if config.table == HOST_TABLE:
        held = [e for s in (current.sets if current else ()) for e in s.elements]
        return render_host(config, [e.network_address for e in held if isinstance(e, Prefix)])
    return render(config, facts())


def ruleset_for(args: SimpleNamespace, config: Config, facts: HostFacts) -> tuple[Ruleset, list[str]]:
    """What to explain, and what to say first.

    Operators ask "is my traffic captured?", which only the kernel answers: so the installed table is
    explained unless capture flags or --config propose another configuration (or --from-kernel insists). A
    proposal that differs from what is installed says so first, since the answer is then hypothetical.
    """
    if proposing(args) and not args.from_kernel:
        try:
            kernel = installed(config)
        except KernelSideError as exc:  # e.g. not root: the proposal alone can still be answered
            return desired(config, None, lambda: facts), [
                f"the installed table could not be read ({exc}): this explains the given configuration only"]
        rendered = desired(config, kernel, lambda: facts)
        if kernel is None:
            return rendered, [f"table inet {config.table} is not installed here: this explains the given "
                              "configuration, not what happens now (nothing is captured now)"]
        found = differences(rendered, kernel)
        if not found:
            return rendered, []
        return rendered, [f"the installed table inet {config.table} differs from the given configuration in "
                          f"{len(found)} places (`interceptd diff` lists them): this explains the given "
                          "configuration, not what happens now"]
    kernel = installed(config)
    if kernel is None:
        raise NotInstalledError(f"table inet {config.table} is not installed in this namespace: nothing is "
                                "captured; give capture flags or --config to explain a proposed configuration")
    return borrow_why(kernel, desired(config, kernel, lambda: facts)), []


def run(args: SimpleNamespace, config: Config, facts: HostFacts) -> int:
    conn = connection(args)
    ruleset, notes = ruleset_for(args, config, facts)
    try:
        result: Explanation = explain(ruleset, conn)
    except KeyError as exc:
        raise NotInstalledError(f"the ruleset refers to {exc} which it does not hold") from None
    if not args.kernel:
        if args.json:
            print(json.dumps({**({"notes": notes} if notes else {}), **as_json(result)}, indent=2))
        else:
            print("".join(f"note: {n}\n" for n in notes) + format_text(result, args.all_steps))
        return 0
    from interceptd.system.trace import compare, probe, probe_interface

    if conn.direction == "inbound":
        # The probe arrives on a temporary veth of this namespace; the model is asked about that interface.
        conn = replace(conn, iif=probe_interface())
        result = explain(ruleset, conn)
    observed = probe(config.table, conn)
    report = compare(result, observed)
    if not report.agree and any(s.action.startswith("tproxy") for s in result.steps):
        # The kernel's tproxy needs a transparent listener: without the proxy running, that is the answer.
        without = explain(ruleset, conn, tproxy_listening=False)
        if compare(without, observed).agree:
            print("interceptd: no transparent listener is bound to the TPROXY port in this namespace: real "
                  "connections like this one are not captured until the proxy listens", file=sys.stderr)
            result, report = without, compare(without, observed)
    if args.json:
        print(json.dumps({**({"notes": notes} if notes else {}), **as_json(result), "kernel": report.as_json()},
                         indent=2))
    else:
        print("".join(f"note: {n}\n" for n in notes) + format_text(result, args.all_steps))
        print(report.text())
    if not report.agree:
        print("interceptd: MODEL AND KERNEL DISAGREE: this is a bug in interceptd; please report it with the "
              "output above", file=sys.stderr)
        return 1
    return 0


def explain_top(config: Config, facts: HostFacts, listing: list[Json], n: int, proposed: bool) -> str:
    """`status --explain-top N`: the busiest deciding rules by packet count, each with what it means.

    The meanings are borrowed from the rendered configuration; an installed rule it does not hold is shown
    as its own text, flagged only when a configuration was given on purpose (the defaults are no claim).
    """
    known = borrow_why(parse_listing(config.table, listing), render(config, facts))
    whys = {(c.name, r.name): r.why for c in known.chains for r in c.rules}
    hooks = {c.name: c.hook.type for c in known.chains if c.hook is not None}
    rules = sorted((r for c in chain_stats(listing) for r in c.rules if r.packets),
                   key=lambda r: (-r.packets, r.chain, r.rule))[:n]
    if not rules:
        return f"no rule of table inet {config.table} has counted anything yet"
    lines = [f"{'packets':>10}  rule: what it means"]
    for r in rules:
        why = whys.get((r.chain, r.rule)) or ("(not in the given configuration) " if proposed else "") + r.text
        lines.append(f"{r.packets:>10}  {r.chain}/{r.rule}: {why}")
    if any(kind == "nat" for kind in hooks.values()):
        lines.append("nat chains see only the first packet of a connection: their counts are connections.")
    return "\n".join(lines)
