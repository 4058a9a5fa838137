"""nftables change events from the kernel (netlink group NFNLGRP_NFTABLES), filtered to one table.

The agent only needs to know *that* its table may have changed: it then lists the table and compares.
So the filter reads each message's header and its table-name attribute and nothing more; events about
other tables are dropped after that. A receive-buffer overflow (ENOBUFS) means events were lost, which
is reported as "changed" so the agent does a full check.
"""

from __future__ import annotations

import errno
import socket
import struct

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # closes each transaction's batch of events; names no table
NFTA_TABLE_NAME = 1  # attribute 1 is the table's name in every nf_tables object message
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
RCVBUF = 4 << 20

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


def _table_attr(data: bytes, offset: int, end: int) -> bytes | None:
    while offset + _NLATTR.size <= end:
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return None
        if attr_type & 0x3FFF == NFTA_TABLE_NAME:
            return data[offset + _NLATTR.size:offset + length].rstrip(b"\0")
        offset += (length + 3) & ~3
    return None


class NftEvents:
    """A non-blocking netlink socket subscribed to nftables events in the current network namespace."""

    def __init__(self, table: str, family: str = "inet") -> None:
        self._table = table.encode()
        self._family = FAMILIES[family]
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE: root may exceed rmem_max
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> bool:
        """Drain every pending datagram; True if one concerned our table or events were lost."""
        changed = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                changed = True  # the kernel dropped events: only a full check can tell what happened
                continue
            changed = changed or concerns(data, self._table, self._family)

    def close(self) -> None:
        self._sock.close()
