"""Read-only rtnetlink dumps (addresses, policy rules, routes) on a plain netlink socket.

The agent reads these on every start, reload and apply; pyroute2 costs about 11 MB of resident memory
once imported, so reading stays on this small module and pyroute2 is only loaded to *change* routes
(TPROXY mode). Each function dumps the network namespace the calling thread is in.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_GETADDR, RTM_NEWADDR = 22, 20
RTM_GETROUTE, RTM_NEWROUTE = 26, 24
RTM_GETRULE, RTM_NEWRULE = 34, 32
IFA_ADDRESS = 1
RTA_TABLE = 15
FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 10, 15, 16, 21

_NLMSGHDR = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    prefixlen: int
    address: str


@dataclass(frozen=True)
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


def _dump(msg_type: int, header: bytes) -> list[tuple[bytes, int, int]]:
    """(datagram, body offset, end) of every message of a dump request."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        seq = os.getpid() & 0xFFFF
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(header), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                  + header)
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
                    raise OSError(code, os.strerror(code))
                out.append((data, offset + _NLMSGHDR.size, min(offset + length, len(data))))
                offset += (length + 3) & ~3


def addresses(family: int = socket.AF_UNSPEC) -> list[Address]:
    out: list[Address] = []
    for data, body, end in _dump(RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
        fam, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(data, body)
        raw = _attrs(data, body + _IFADDRMSG.size, end).get(IFA_ADDRESS)
        if raw is not None and fam in (socket.AF_INET, socket.AF_INET6):
            out.append(Address(index, fam, prefixlen, str(ipaddress.ip_address(raw))))
    return out


def _table(data: bytes, body: int, end: int, attr: int) -> tuple[int, dict[int, bytes]]:
    header = _RTMSG.unpack_from(data, body)
    attrs = _attrs(data, body + _RTMSG.size, end)
    table = struct.unpack("=I", attrs[attr])[0] if attr in attrs else header[4]
    return table, attrs


def rules(family: int) -> list[RuleOrRoute]:
    out: list[RuleOrRoute] = []
    for data, body, end in _dump(RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        table, attrs = _table(data, body, end, FRA_TABLE)
        protocol = attrs[FRA_PROTOCOL][0] if FRA_PROTOCOL in attrs else 0
        fwmark = struct.unpack("=I", attrs[FRA_FWMARK])[0] if FRA_FWMARK in attrs else 0
        fwmask = struct.unpack("=I", attrs[FRA_FWMASK])[0] if FRA_FWMASK in attrs else 0xFFFFFFFF
        out.append(RuleOrRoute(data[body], table, protocol, fwmark, fwmask))
    return out


def routes(family: int) -> list[RuleOrRoute]:
    out: list[RuleOrRoute] = []
    for data, body, end in _dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        table, _ = _table(data, body, end, RTA_TABLE)
        out.append(RuleOrRoute(data[body], table, data[body + 5], 0))
    return out
