"""Facts about the network namespace that the ruleset depends on (Istio computes the same: docs/istio-compatibility.md,
"Values read from the namespace").

`detect` does the I/O; `decide_ipv6` and `parse_resolv_conf` are pure so they can be unit-tested.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton  # the C module under socket, without socket.py's imports

from interceptd.config import Config
from interceptd.errors import ConfigError, HostError
from interceptd.ruleset.facts import HostFacts, is_link_local, is_link_local_multicast, is_loopback
from interceptd.system import rtnl

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Iterable

RT_SCOPE_UNIVERSE = 0  # ifa_scope of a global address


def eligible(address: str) -> bool:
    """Istio skips loopback, link-local unicast and link-local multicast addresses. `address` is an address as
    rtnetlink's bytes are written (ipaddress' text, no zone)."""
    version = 6 if ":" in address else 4
    value = int.from_bytes(inet_pton(AF_INET6 if version == 6 else AF_INET, address), "big")
    return not (is_loopback(version, value) or is_link_local(version, value)
                or is_link_local_multicast(version, value))


def decide_ipv6(addresses: Iterable[str], dual_stack: bool) -> tuple[bool, str]:
    """Without dual-stack the first eligible address decides; with it, any eligible IPv6 address."""
    usable = [a for a in addresses if eligible(a)]
    if not usable:
        raise HostError("no valid local IP address found (the namespace has no global address)")
    if dual_stack:
        return any(":" in a for a in usable), usable[0]
    return ":" in usable[0], usable[0]


def parse_resolv_conf(text: str) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
    """The nameservers, deduplicated in order; read only when DNS is captured (ipaddress is imported here)."""
    import ipaddress

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


def interface_addresses() -> list[str]:
    """Addresses of this namespace in interface-index order, like Go's net.InterfaceAddrs()."""
    found = rtnl.addresses()
    order = sorted(range(len(found)), key=lambda n: (found[n].index, n))
    return [found[n].address for n in order]


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


def detect(config: Config, addresses: list[str] | None = None, resolv_text: str | None = None,
           ipv6_override: bool | None = None) -> HostFacts:
    """Read what the ruleset depends on from the current namespace (or use the given facts)."""
    host_ip: str | None = None
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

