"""Kernel change events that may mean drift: nftables (NFNLGRP_NFTABLES) filtered to one table, and the
policy rules, routes and addresses interceptd owns for TPROXY (rtnetlink, filtered to routes.ROUTE_PROTOCOL).

The agent only needs to know *that* its table may have changed: it then lists the table and compares.
So the filter reads each message's header and its table-name attribute and nothing more; events about
other tables are dropped after that. A receive-buffer overflow (ENOBUFS) means events were lost, which
is reported as "changed" so the agent does a full check.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Callable

from interceptd.system.fds import move_high
from interceptd.system.routes import ROUTE_PROTOCOL

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # closes each transaction's batch of events; names no table
NFTA_TABLE_NAME = 1  # attribute 1 is the table's name in every nf_tables object message
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
RCVBUF = 4 << 20

# rtnetlink: groups and messages about what routes.py installs
RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE = 7, 8, 9, 11, 19
RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 21, 24, 25, 32, 33
FRA_PROTOCOL = 21
_RULE_HDR = 12  # struct fib_rule_hdr
_RTM_PROTOCOL = 5  # offset of rtm_protocol in struct rtmsg

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id
_NLATTR = struct.Struct("=HH")  # len, type


def concerns(data: bytes, table: bytes, family: int) -> bool:
    """Does any nf_tables message in this netlink datagram name `family table`?"""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return True  # malformed: let the full check decide
        end = min(offset + length, len(data))
        body = offset + _NLMSGHDR.size
        if (msg_type >> 8 == NFNL_SUBSYS_NFTABLES and msg_type & 0xFF != NFT_MSG_NEWGEN
                and body + _NFGENMSG.size <= end and data[body] == family
                and _table_attr(data, body + _NFGENMSG.size, end) == table):
            return True
        offset += (length + 3) & ~3
    return False


def concerns_routes(data: bytes) -> bool:
    """Does any rtnetlink message in this datagram touch a rule or route interceptd owns, or an IPv6 address
    (the ::6 passthrough address) going away?"""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return True
        end = min(offset + length, len(data))
        body = offset + _NLMSGHDR.size
        if msg_type == RTM_DELADDR:
            return True
        if msg_type in (RTM_NEWROUTE, RTM_DELROUTE) and body + _RTM_PROTOCOL < end \
                and data[body + _RTM_PROTOCOL] == ROUTE_PROTOCOL:
            return True
        if msg_type in (RTM_NEWRULE, RTM_DELRULE) and \
                _attr(data, body + _RULE_HDR, end, FRA_PROTOCOL) == bytes([ROUTE_PROTOCOL]):
            return True
        offset += (length + 3) & ~3
    return False


def _table_attr(data: bytes, offset: int, end: int) -> bytes | None:
    name = _attr(data, offset, end, NFTA_TABLE_NAME)
    return None if name is None else name.rstrip(b"\0")


def _attr(data: bytes, offset: int, end: int, wanted: int) -> bytes | None:
    while offset + _NLATTR.size <= end:
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return None
        if attr_type & 0x3FFF == wanted:
            return data[offset + _NLATTR.size:offset + length]
        offset += (length + 3) & ~3
    return None


def _subscribe(protocol: int, groups: tuple[int, ...]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE: root may exceed rmem_max
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except OSError:
        sock.close()
        raise
    return sock


class NftEvents:
    """Non-blocking netlink sockets (nftables and rtnetlink) in the current network namespace, behind one
    epoll descriptor so the agent's loop waits on a single fileno()."""

    def __init__(self, table: str, family: str = "inet") -> None:
        self._table = table.encode()
        self._family = FAMILIES[family]
        self._nft = _subscribe(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))
        try:
            self._rt = _subscribe(socket.NETLINK_ROUTE, (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_IFADDR,
                                                         RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE))
        except OSError:
            self._nft.close()
            raise
        # Long-lived: above FD_SETSIZE, so that a node agent's hundreds of these leave libnftables low ones.
        self._nft, self._rt = move_high(self._nft), move_high(self._rt)
        poll = select.epoll()
        self._poll = select.epoll.fromfd(move_high(os.dup(poll.fileno())))
        poll.close()
        self._poll.register(self._nft.fileno(), select.EPOLLIN)
        self._poll.register(self._rt.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        return self._poll.fileno()

    def read(self) -> bool:
        """Drain every pending datagram; True if one concerned our state or events were lost."""
        nft = _drain(self._nft, lambda data: concerns(data, self._table, self._family))
        return _drain(self._rt, concerns_routes) or nft

    def close(self) -> None:
        self._poll.close()
        self._nft.close()
        self._rt.close()


def _drain(sock: socket.socket, relevant: Callable[[bytes], bool]) -> bool:
    changed = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return changed
        except OSError as exc:
            # ENOBUFS: the kernel dropped events. Any other error: the socket cannot tell us more now. Either
            # way only a full check can tell what happened (and the periodic check goes on regardless).
            if exc.errno != errno.ENOBUFS:
                return True
            changed = True
            continue
        changed = changed or relevant(data)
