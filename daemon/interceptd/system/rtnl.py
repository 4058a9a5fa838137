"""rtnetlink on a plain netlink socket: dumps of addresses, policy rules and routes, `ip route get`, and the
few changes interceptd makes (TPROXY's fwmark rule and local route, the ::6 address on lo).

The agent reads these on every start, reload and apply, and an init container or CNI ADD of an IPv6 or
TPROXY pod changes them once: pyroute2 would cost about 11 MB of resident memory and 40 ms of imports
(asyncio among them) for a handful of fixed-format messages. Each function works in the network namespace
the calling thread is in.
"""

from __future__ import annotations

import _socket
import errno
import os
import struct

from interceptd.config.values import ip_text
from interceptd.records import record

# From _socket, the C module under `socket`: socket.py's enum wrappers and the selectors it imports cost an
# init container's apply 2 ms at each start, and plain integers and a raw socket are all netlink needs.
AF_UNSPEC, AF_INET, AF_INET6 = _socket.AF_UNSPEC, _socket.AF_INET, _socket.AF_INET6
if_nametoindex = _socket.if_nametoindex

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
IFA_ADDRESS = 1
RTA_DST, RTA_OIF, RTA_PREFSRC, RTA_TABLE = 1, 4, 7, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 6, 10, 15, 16, 21
FR_ACT_TO_TBL, RTN_LOCAL = 1, 2

_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NLATTR = struct.Struct("=HH")


@record
class Address:
    index: int
    family: int
    prefixlen: int
    address: str
    scope: int  # RT_SCOPE_UNIVERSE (0) for a global address, host (254) or link (253) otherwise


@record
class RuleOrRoute:
    """A policy rule (fib_rule_hdr) or a route (rtmsg): both start with the same eight bytes."""

    family: int
    table: int
    protocol: int
    fwmark: int  # rules only
    fwmask: int = 0xFFFFFFFF  # rules only: the kernel's default for a mark given without a mask


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _NLATTR.size:offset + length]
        offset += (length + 3) & ~3
    return out


def _request(msg_type: int, body: bytes, flags: int = NLM_F_DUMP) -> list[tuple[bytes, int, int]]:
    """(datagram, body offset, end) of every answer: all messages of a dump (NLM_F_DUMP), the one answer of a
    get, none for a change (NLM_F_ACK: the kernel's acknowledgement ends it). A refusal raises OSError."""
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        seq = os.getpid() & 0xFFFF
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0) + body)
        out: list[tuple[bytes, int, int]] = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    if code == 0:  # the acknowledgement of a change
                        return out
                    raise OSError(code, os.strerror(code))
                out.append((data, offset + _NLMSGHDR.size, min(offset + length, len(data))))
                offset += (length + 3) & ~3
            if not flags & (NLM_F_DUMP | NLM_F_ACK):
                return out
    finally:  # _socket's socket is no context manager
        sock.close()


def _attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes as netlink wants."""
    raw = _NLATTR.pack(_NLATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) & 3)


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _change(add: bool, new: int, delete: int, body: bytes) -> None:
    """Add (refused with EEXIST when already there: no duplicate rule) or delete; OSError when refused."""
    if add:
        _request(new, body, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
    else:
        _request(delete, body, NLM_F_ACK)


def change_rule(add: bool, family: int, mark: int, table: int, priority: int, protocol: int,
                mask: int = 0xFFFFFFFF) -> None:
    """`ip rule add|del fwmark MARK/MASK lookup TABLE priority PRIORITY protocol PROTOCOL`."""
    header = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
    _change(add, RTM_NEWRULE, RTM_DELRULE, header + _attr(FRA_FWMARK, _u32(mark)) + _attr(FRA_FWMASK, _u32(mask))
            + _attr(FRA_TABLE, _u32(table)) + _attr(FRA_PRIORITY, _u32(priority))
            + _attr(FRA_PROTOCOL, bytes([protocol])))


def change_local_route(add: bool, family: int, table: int, oif: int, protocol: int, scope: int) -> None:
    """`ip route add|del local default dev OIF table TABLE proto PROTOCOL scope SCOPE`."""
    header = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, protocol, scope, RTN_LOCAL, 0)
    _change(add, RTM_NEWROUTE, RTM_DELROUTE, header + _attr(RTA_TABLE, _u32(table)) + _attr(RTA_OIF, _u32(oif)))


def change_address(add: bool, index: int, address: str, prefixlen: int) -> None:
    """`ip address add|del ADDRESS/PREFIXLEN dev INDEX`."""
    import ipaddress  # TPROXY's and IPv6's ::6 on lo, not the usual apply

    addr = ipaddress.ip_address(address)
    family = AF_INET if addr.version == 4 else AF_INET6
    _change(add, RTM_NEWADDR, RTM_DELADDR, _IFADDRMSG.pack(family, prefixlen, 0, 0, index)
            + _attr(IFA_ADDRESS, addr.packed))


def addresses(family: int = AF_UNSPEC) -> list[Address]:
    out: list[Address] = []
    for data, body, end in _request(RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
        fam, prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(data, body)
        raw = _attrs(data, body + _IFADDRMSG.size, end).get(IFA_ADDRESS)
        if raw is not None and fam in (AF_INET, AF_INET6):
            out.append(Address(index, fam, prefixlen, ip_text(raw), scope))
    return out


def _table(data: bytes, body: int, end: int, attr: int) -> tuple[int, dict[int, bytes]]:
    header = _RTMSG.unpack_from(data, body)
    attrs = _attrs(data, body + _RTMSG.size, end)
    table = struct.unpack("=I", attrs[attr])[0] if attr in attrs else header[4]
    return table, attrs


def rules(family: int) -> list[RuleOrRoute]:
    out: list[RuleOrRoute] = []
    for data, body, end in _request(RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        table, attrs = _table(data, body, end, FRA_TABLE)
        protocol = attrs[FRA_PROTOCOL][0] if FRA_PROTOCOL in attrs else 0
        fwmark = struct.unpack("=I", attrs[FRA_FWMARK])[0] if FRA_FWMARK in attrs else 0
        fwmask = struct.unpack("=I", attrs[FRA_FWMASK])[0] if FRA_FWMASK in attrs else 0xFFFFFFFF
        out.append(RuleOrRoute(data[body], table, protocol, fwmark, fwmask))
    return out


def routes(family: int) -> list[RuleOrRoute]:
    out: list[RuleOrRoute] = []
    for data, body, end in _request(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        table, _ = _table(data, body, end, RTA_TABLE)
        out.append(RuleOrRoute(data[body], table, data[body + 5], 0))
    return out


def route_get(dst: str) -> tuple[int, str | None]:
    """`ip route get DST`: the index of the interface the kernel routes DST through, and the preferred source
    address when the route names one (explain asks this for one connection: no pyroute2 for that)."""
    import ipaddress  # explain's

    addr = ipaddress.ip_address(dst)
    family = AF_INET if addr.version == 4 else AF_INET6
    packed = addr.packed
    header = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, packed)
    for data, body, end in _request(RTM_GETROUTE, header, flags=0):
        attrs = _attrs(data, body + _RTMSG.size, end)
        if RTA_OIF in attrs:
            src = attrs.get(RTA_PREFSRC)
            return struct.unpack("=I", attrs[RTA_OIF])[0], str(ipaddress.ip_address(src)) if src else None
    raise OSError(errno.ENETUNREACH, f"no route to {dst}")
