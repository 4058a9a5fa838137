"""`explain --kernel`: ask the kernel itself which of interceptd's rules a real probe connection matches.

How: a short-lived table of our own (`<table>-trace`) hooks output and prerouting at priority -400, before
every interceptd chain, and sets `meta nftrace` on the probe's first packet only (its unique source port,
SYN only). The probe is made for real (as the given uid/gid, in a forked child), or for an inbound
connection injected as an Ethernet frame into a temporary veth pair of the current namespace, so it arrives
on an interface like a packet from the peer would (and is dropped at input/forward by the trace table, so
nothing answers it). Trace events are read from the NFNLGRP_NFTRACE netlink group and mapped back to rule
names via the handles of our table's listing. The trace table and the veth are always removed.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from interceptd.errors import TraceError
from interceptd.ruleset.explain import Connection, Explanation
from interceptd.ruleset.nftjson import Json, deletion
from interceptd.ruleset.nftparse import rule_handles
from interceptd.system.kernel import NftKernel

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTRACE = 9
NFT_MSG_TRACE = (10 << 8) | 17  # NFNL_SUBSYS_NFTABLES, NFT_MSG_TRACE
NLMSG_ERROR, NLMSG_DONE = 2, 3
TRACE_TABLE, TRACE_CHAIN, TRACE_RULE_HANDLE, TRACE_TYPE, TRACE_VERDICT, TRACE_ID = 1, 2, 3, 4, 5, 6
TRACETYPE_RULE = 3
VERDICT_CODE = 1
VERDICTS = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", -1: "continue", -2: "break", -3: "jump",
            -4: "goto", -5: "return"}
TRACE_PRIORITY = -400  # before raw (-300), so every interceptd chain is traced
SETTLE_S = 0.3  # how long events may trail the probe


@dataclass(frozen=True)
class TraceEvent:
    table: str
    chain: str
    handle: int
    verdict: str


@dataclass(frozen=True)
class Observed:
    rules: tuple[str, ...]  # "<chain>/<rule>" of interceptd's table, in the order the kernel matched them
    verdicts: tuple[str, ...]  # the kernel's verdict per rule
    other_tables: tuple[str, ...]  # other tables the probe's packet met (the first nat chain that NATs wins)
    iif: str  # the interface an inbound probe arrived on


@dataclass(frozen=True)
class Report:
    model: tuple[str, ...]
    observed: Observed

    @property
    def agree(self) -> bool:
        return self.model == self.observed.rules

    def text(self) -> str:
        lines = ["kernel trace of a real probe (rules of our table the kernel matched, in order):"]
        lines += [f"  {rule} -> {verdict}" for rule, verdict in zip(self.observed.rules, self.observed.verdicts,
                                                                     strict=True)]
        if not self.observed.rules:
            lines.append("  (none: the probe's first packet met no rule of the table)")
        if self.observed.other_tables:
            lines.append("other tables on the path (they decide too): " + ", ".join(self.observed.other_tables))
        if self.agree:
            lines.append(f"kernel agrees with the model: the same {len(self.model)} rules matched, in order")
            return "\n".join(lines)
        first = next((i for i, (a, b) in enumerate(zip(self.model, self.observed.rules, strict=False)) if a != b),
                     min(len(self.model), len(self.observed.rules)))
        lines.append("!!! KERNEL AND MODEL DISAGREE !!!")
        lines.append("  model:  " + ", ".join(self.model))
        lines.append("  kernel: " + ", ".join(self.observed.rules))
        lines.append(f"  first difference at match #{first + 1}: model "
                     f"{self.model[first] if first < len(self.model) else '(nothing)'}, kernel "
                     f"{self.observed.rules[first] if first < len(self.observed.rules) else '(nothing)'}")
        if any("tproxy" in r for r in self.model):
            lines.append("  (TPROXY matches only when a transparent listener is bound to the port)")
        return "\n".join(lines)

    def as_json(self) -> Json:
        return {"agree": self.agree, "rules": list(self.observed.rules), "verdicts": list(self.observed.verdicts),
                "other_tables": list(self.observed.other_tables)}


def compare(model: Explanation, observed: Observed) -> Report:
    return Report(tuple(model.matched()), observed)


# -- netlink ---------------------------------------------------------------------------------------

def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def parse_messages(data: bytes) -> list[TraceEvent]:
    """NFT_MSG_TRACE messages of one netlink datagram: table, chain, rule handle and verdict."""
    events: list[TraceEvent] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == NFT_MSG_TRACE:
            attrs = dict(_attrs(data[offset + 20:offset + length]))
            if TRACE_RULE_HANDLE in attrs and struct.unpack("!I", attrs.get(TRACE_TYPE, b"\0\0\0\0"))[0] == \
                    TRACETYPE_RULE:
                code = dict(_attrs(attrs.get(TRACE_VERDICT, b""))).get(VERDICT_CODE)
                verdict = VERDICTS.get(struct.unpack("!i", code)[0], "?") if code else "?"
                events.append(TraceEvent(attrs[TRACE_TABLE].rstrip(b"\0").decode(),
                                         attrs[TRACE_CHAIN].rstrip(b"\0").decode(),
                                         struct.unpack("!Q", attrs[TRACE_RULE_HANDLE])[0], verdict))
        offset += (length + 3) & ~3
    return events


def _trace_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
    except OSError as exc:
        raise TraceError(f"cannot subscribe to nftables trace events: {exc.strerror} (needs CAP_NET_ADMIN)") \
            from None
    return sock


def _drain(sock: socket.socket, quiet_s: float, first_s: float = 2.0) -> list[TraceEvent]:
    """Events until none came for quiet_s; on a loaded host the first may take longer (softirq backlog)."""
    events: list[TraceEvent] = []
    while select.select([sock], [], [], quiet_s if events else first_s)[0]:
        events += parse_messages(sock.recv(65536))
    return events


# -- the trace table -------------------------------------------------------------------------------

def trace_table(name: str, conn: Connection, sport: int, drop_iif: str = "") -> Json:
    """Our short-lived table: nftrace on the probe's first packet; inbound probes go no further than routing."""
    fam = "inet"
    proto = conn.protocol
    match = [{"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "sport"}}, "right": sport}}]
    if proto == "tcp":
        match.append({"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                                             ["syn", "ack"]]}, "right": "syn"}})
    trace = {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}
    cmds: list[Json] = [{"add": {"table": {"family": fam, "name": name}}}]
    hooks = [("prerouting", TRACE_PRIORITY), ("output", TRACE_PRIORITY)]
    if drop_iif:
        hooks += [("input", 400), ("forward", 400)]
    for hook, prio in hooks:
        cmds.append({"add": {"chain": {"family": fam, "table": name, "name": hook, "type": "filter", "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
        if hook in ("input", "forward"):
            iif = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": drop_iif}}
            expr: list[Json] = [iif, *match, {"drop": None}]
        else:
            expr = [*match, trace]
        cmds.append({"add": {"rule": {"family": fam, "table": name, "chain": hook, "expr": expr}}})
    return {"nftables": cmds}


@contextmanager
def _installed(kernel: NftKernel, name: str, document: Json) -> Iterator[None]:
    kernel.apply(deletion(name))
    kernel.apply(document)
    try:
        yield
    finally:
        kernel.apply(deletion(name))


# -- probes ----------------------------------------------------------------------------------------

def _free_port(conn: Connection) -> int:
    family = socket.AF_INET6 if conn.family == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if conn.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.bind(("::" if conn.family == 6 else "0.0.0.0", 0))
        return int(s.getsockname()[1])


def _connect_as(conn: Connection, sport: int, wait_s: float) -> None:
    """In a forked child: become uid/gid, bind the probe's source, send the first packet, wait, close."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if conn.gid is not None and conn.uid is not None and (conn.uid, conn.gid) != (os.getuid(), os.getgid()):
                os.setgroups([])
                os.setgid(conn.gid)
                os.setuid(conn.uid)
            family = socket.AF_INET6 if conn.family == 6 else socket.AF_INET
            kind = socket.SOCK_STREAM if conn.protocol == "tcp" else socket.SOCK_DGRAM
            with socket.socket(family, kind) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6,
                             15 if family == socket.AF_INET else 78, 1)  # IP(V6)_FREEBIND
                if conn.mark:  # ambient's node proxy: needs CAP_NET_ADMIN, so an unprivileged uid cannot
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, conn.mark)
                s.bind((str(conn.src), sport))
                if kind == socket.SOCK_STREAM:
                    s.setblocking(False)
                    s.connect_ex((str(conn.dst), conn.dport))
                    select.select([], [s], [], wait_s)
                else:
                    s.sendto(b"interceptd-explain-probe", (str(conn.dst), conn.dport))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise TraceError(f"the probe connection as uid {conn.uid} gid {conn.gid} from {conn.src}:{sport} could "
                         "not be made")


def probe_interface() -> str:
    """The veth end an inbound probe arrives on (interface names are at most 15 bytes)."""
    return f"icdprobe{os.getpid() % 1000000}"


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum (IPv4 header, TCP/UDP with the pseudo header)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def frame(conn: Connection, sport: int, dst_mac: bytes, src_mac: bytes) -> bytes:
    """An Ethernet frame carrying the connection's first packet (TCP SYN or one UDP datagram)."""
    src, dst = conn.src.packed, conn.dst.packed
    proto = 6 if conn.protocol == "tcp" else 17
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, conn.dport, 0x1CD0_0001, 0, 5 << 4, 0x02, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, conn.dport, 8 + 4, 0) + b"ping"
    if conn.family == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
    csum_at = 16 if proto == 6 else 6
    l4 = l4[:csum_at] + struct.pack("!H", internet_checksum(pseudo + l4)) + l4[csum_at + 2:]
    if conn.family == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1CD0, 0x4000, 64, proto, 0, src, dst)
        head = head[:10] + struct.pack("!H", internet_checksum(head)) + head[12:]
        return dst_mac + src_mac + b"\x08\x00" + head + l4
    head = struct.pack("!IHBB16s16s", 0x6 << 28, len(l4), proto, 64, src, dst)
    return dst_mac + src_mac + b"\x86\xdd" + head + l4


def _inject(conn: Connection, sport: int, inside: str) -> None:
    """Create a veth pair here, send the frame out of one end so it arrives on `inside`, delete the pair."""
    from pyroute2 import IPRoute

    outside = inside + "x" if len(inside) < 15 else inside[:-1] + "x"
    with IPRoute() as ipr:
        ipr.link("add", ifname=inside, kind="veth", peer=outside)
        try:
            macs: dict[str, bytes] = {}
            for name in (inside, outside):
                index = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=index, state="up")
                link = ipr.get_links(index)[0]
                macs[name] = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind((outside, 0))
                raw.send(frame(conn, sport, macs[inside], macs[outside]))
            time.sleep(0.05)
        finally:
            with suppress(Exception):  # the pair may be half-made; deleting one end removes both
                ipr.link("del", index=ipr.link_lookup(ifname=inside)[0])


def probe(table: str, conn: Connection) -> Observed:
    """Make the connection's first packet for real and return the rules of `table` the kernel matched."""
    kernel = NftKernel()
    listing = kernel.list_table(table)
    if listing is None:
        raise TraceError(f"table inet {table} is not installed in this namespace: nothing to trace")
    names = rule_handles(listing)
    sport = conn.sport if conn.direction == "inbound" else _free_port(conn)
    inbound = conn.direction == "inbound"
    document = trace_table(f"{table}-trace", conn, sport, conn.iif if inbound else "")
    sock = _trace_socket()
    try:
        with _installed(kernel, f"{table}-trace", document):
            if inbound:
                _inject(conn, sport, conn.iif)
            else:
                _connect_as(conn, sport, SETTLE_S)
            events = _drain(sock, SETTLE_S)
    finally:
        sock.close()
    ours = [e for e in events if e.table == table]
    others = sorted({e.table for e in events if e.table not in (table, f"{table}-trace")})
    rules = tuple(f"{e.chain}/{names.get((e.chain, e.handle), f'handle-{e.handle}')}" for e in ours)
    return Observed(rules, tuple(e.verdict for e in ours), tuple(others), conn.iif)

