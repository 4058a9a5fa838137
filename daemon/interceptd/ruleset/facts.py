"""What the ruleset depends on besides the configuration: facts read from the target network namespace.

Defined here, in the pure layer, so that `render` takes them as a value; `system.host` reads them.
"""

from __future__ import annotations

from interceptd.records import record

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    import ipaddress

    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@record
class HostFacts:
    ipv6: bool  # capture IPv6 too
    host_ip: str | None  # the address that decided `ipv6`, as ipaddress writes it
    dns_v4: tuple[ipaddress.IPv4Address, ...] = ()
    dns_v6: tuple[ipaddress.IPv6Address, ...] = ()


# Istio's address tests (Go's net.IP methods, the same as ipaddress' properties) on an address's integer: the
# namespace's addresses come from rtnetlink as bytes, and an init container's apply need not import ipaddress
# to skip its loopback and link-local ones.

def is_loopback(version: int, value: int) -> bool:
    """ipaddress' is_loopback: 127.0.0.0/8 or ::1."""
    return value >> 24 == 127 if version == 4 else value == 1


def is_link_local(version: int, value: int) -> bool:
    """ipaddress' is_link_local: 169.254.0.0/16 or fe80::/10."""
    return value >> 16 == 0xA9FE if version == 4 else value >> 118 == 0x3FA


def is_link_local_multicast(version: int, value: int) -> bool:
    """224.0.0.0/24, or an IPv6 multicast address of link-local scope (ff02::/16 with any flags: ffX2::)."""
    return value >> 8 == 0xE00000 if version == 4 else (value >> 112) & 0xFF0F == 0xFF02
