"""What the ruleset depends on besides the configuration: facts read from the target network namespace.

Defined here, in the pure layer, so that `render` takes them as a value; `system.host` reads them.
"""

from __future__ import annotations

import ipaddress

from interceptd.records import record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@record
class HostFacts:
    ipv6: bool  # capture IPv6 too
    host_ip: IPAddress | None
    dns_v4: tuple[ipaddress.IPv4Address, ...] = ()
    dns_v6: tuple[ipaddress.IPv6Address, ...] = ()
