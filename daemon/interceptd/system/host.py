"""Facts about the network namespace that the ruleset depends on (Istio computes the same: docs/istio-compatibility.md,
"Values read from the namespace").

`detect` does the I/O; `decide_ipv6` and `parse_resolv_conf` are pure so they can be unit-tested.
"""

from __future__ import annotations

import ipaddress

from interceptd.config import Config
from interceptd.errors import ConfigError, HostError
from interceptd.ruleset.facts import HostFacts, IPAddress
from interceptd.system import rtnl

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Iterable

RT_SCOPE_UNIVERSE = 0  # ifa_scope of a global address


def eligible(address: IPAddress) -> bool:
    """Istio skips loopback, link-local unicast and link-local multicast addresses."""
    return not (address.is_loopback or address.is_link_local
                or (address.is_multicast and _is_link_local_multicast(address)))


def _is_link_local_multicast(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.ip_network("224.0.0.0/24")
    return (int(address) >> 112) & 0xFF0F == 0xFF02


def decide_ipv6(addresses: Iterable[IPAddress], dual_stack: bool) -> tuple[bool, IPAddress]:
    """Without dual-stack the first eligible address decides; with it, any eligible IPv6 address."""
    usable = [a for a in addresses if eligible(a)]
    if not usable:
        raise HostError("no valid local IP address found (the namespace has no global address)")
    if dual_stack:
        return any(a.version == 6 for a in usable), usable[0]
    return usable[0].version == 6, usable[0]


def parse_resolv_conf(text: str) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            target = v4 if isinstance(addr, ipaddress.IPv4Address) else v6
            if addr not in target:
                target.append(addr)  # type: ignore[arg-type]
    return tuple(v4), tuple(v6)


def interface_addresses() -> list[IPAddress]:
    """Addresses of this namespace in interface-index order, like Go's net.InterfaceAddrs()."""
    found = rtnl.addresses()
    order = sorted(range(len(found)), key=lambda n: (found[n].index, n))
    return [ipaddress.ip_address(found[n].address) for n in order]


def pod_addresses() -> list[str]:
    """This namespace's global-scope addresses on interfaces other than the loopback, in interface order: what
    a pod is reached at. 127.0.0.1 and ::1 (host scope), link-local addresses and whatever sits on lo (the ::6
    that interceptd's own TPROXY setup adds there) are never the pod's."""
    try:
        lo = rtnl.if_nametoindex("lo")
    except OSError:
        lo = 0  # no loopback interface: no index is 0
    found = [a for a in rtnl.addresses() if a.scope == RT_SCOPE_UNIVERSE and a.index != lo]
    return [a.address for a in sorted(found, key=lambda a: a.index)]


def detect(config: Config, addresses: list[IPAddress] | None = None, resolv_text: str | None = None,
           ipv6_override: bool | None = None) -> HostFacts:
    """Read what the ruleset depends on from the current namespace (or use the given facts)."""
    host_ip: IPAddress | None = None
    if ipv6_override is None:
        ipv6, host_ip = decide_ipv6(interface_addresses() if addresses is None else addresses,
                                    config.dual_stack)
    else:
        ipv6 = ipv6_override
    dns_v4: tuple[ipaddress.IPv4Address, ...] = ()
    dns_v6: tuple[ipaddress.IPv6Address, ...] = ()
    if config.redirect_dns and not config.capture_all_dns:
        if resolv_text is None:
            try:
                with open(config.resolv_conf, encoding="utf-8") as fh:
                    resolv_text = fh.read()
            except OSError as exc:
                raise ConfigError(f"--resolv-conf: cannot read {config.resolv_conf!r}: {exc.strerror}") from None
        dns_v4, dns_v6 = parse_resolv_conf(resolv_text)
    return HostFacts(ipv6=ipv6, host_ip=host_ip, dns_v4=dns_v4, dns_v6=dns_v6 if ipv6 else ())

