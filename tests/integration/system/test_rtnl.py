"""rtnl's read-only dumps agree with iproute2 in a lab namespace (addresses, interceptd's rules and routes)."""

from __future__ import annotations

import json
import socket

from support.netlab import Lab, call_in, sh

from interceptd.system import rtnl


def test_dumps_agree_with_iproute2(lab6: Lab) -> None:
    lab6.interceptd("apply", "-m", "TPROXY", "-b", "*", "-i", "*", "--dual-stack")
    ours = call_in(lab6.pod, lambda: sorted((a.address, a.prefixlen) for a in rtnl.addresses()))
    theirs = sorted((a["local"], a["prefixlen"]) for link in json.loads(sh("ip", "-j", "addr", ns=lab6.pod).stdout)
                    for a in link["addr_info"])
    assert ours == theirs
    rules = call_in(lab6.pod, lambda: [(r.family, r.table, r.protocol, r.fwmark)
                                        for f in (socket.AF_INET, socket.AF_INET6) for r in rtnl.rules(f)
                                        if r.protocol == 245])
    assert sorted(rules) == [(socket.AF_INET, 133, 245, 1337), (socket.AF_INET6, 133, 245, 1337)]
    routes = call_in(lab6.pod, lambda: [(r.family, r.table) for f in (socket.AF_INET, socket.AF_INET6)
                                         for r in rtnl.routes(f) if r.protocol == 245])
    assert sorted(routes) == [(socket.AF_INET, 133), (socket.AF_INET6, 133)]


def test_route_get_agrees_with_iproute2(lab6: Lab) -> None:
    for dst in ("198.51.100.7", "192.0.2.1", "2001:db8::1", "127.0.0.1"):
        theirs = json.loads(sh("ip", "-j", "route", "get", dst, ns=lab6.pod).stdout)[0]
        index, src = call_in(lab6.pod, rtnl.route_get, dst)
        assert call_in(lab6.pod, socket.if_indextoname, index) == theirs["dev"]
        assert src == theirs.get("prefsrc"), dst
    try:
        call_in(lab6.pod, rtnl.route_get, "2001:db8:ffff::1")  # no IPv6 default route in the lab's pod
    except RuntimeError as exc:
        assert "unreachable" in str(exc)
    else:
        raise AssertionError("a destination without a route has no answer")
