"""rtnl's read-only dumps agree with iproute2 in a lab namespace (addresses, interceptd's rules and routes)."""

from __future__ import annotations

import json
import socket

from support.netlab import Lab, call_in, sh

from interceptd.system import host, rtnl


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


def test_a_pods_addresses_are_its_global_ones_off_the_loopback(lab6: Lab) -> None:
    """What the node agent reads from a watched-directory pod for the host probe sets: not 127.0.0.1 or ::1, not
    the link-local fe80::, not the ::6 that TPROXY puts on lo; each global address of eth0, as iproute2 lists."""
    lab6.interceptd("apply", "-m", "TPROXY", "-b", "*", "-i", "*", "--dual-stack")
    sh("ip", "link", "set", "lo", "up", ns=lab6.pod)
    theirs = [a["local"] for link in json.loads(sh("ip", "-j", "addr", "show", "scope", "global", ns=lab6.pod).stdout)
              if link["ifname"] != "lo" for a in link["addr_info"] if "local" in a]  # filtered out: {}
    assert sorted(theirs) == ["192.0.2.2", "2001:db8::2"]
    assert sorted(call_in(lab6.pod, host.pod_addresses)) == theirs
    on_lo = sh("ip", "-o", "addr", "show", "dev", "lo", ns=lab6.pod).stdout
    assert "::6/" in on_lo and "127.0.0.1/" in on_lo  # there, and left out


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


def _table_133(ns: str, family: str) -> list[object]:
    shown = sh("ip", family, "-j", "route", "show", "table", "133", ns=ns, check=False)
    return json.loads(shown.stdout) if shown.returncode == 0 else []  # no such table (yet): an error


def _routing_state(ns: str) -> dict[str, object]:
    """What `ip` shows of rules, the lookup table 133 and lo's addresses (the kernel's own words)."""
    return {"rules": [json.loads(sh("ip", *f, "-j", "rule", ns=ns).stdout) for f in (["-4"], ["-6"])],
            "routes": [_table_133(ns, f) for f in ("-4", "-6")],
            "::6 on lo": [a["prefixlen"] for a in json.loads(sh("ip", "-j", "addr", "show", "dev", "lo",
                                                                ns=ns).stdout)[0]["addr_info"] if a["local"] == "::6"]}


def _change_all(add: bool) -> None:
    lo = socket.if_nametoindex("lo")
    for fam in (socket.AF_INET, socket.AF_INET6):
        rtnl.change_rule(add, fam, 1337, 133, 32765, 245)
        rtnl.change_local_route(add, fam, 133, lo, 245, 254)
    rtnl.change_address(add, lo, "::6", 128)


def test_changes_are_what_iproute2_makes(lab6: Lab) -> None:
    before = _routing_state(lab6.pod)
    for ip in (["-4"], ["-6"]):
        sh("ip", *ip, "rule", "add", "fwmark", "1337", "lookup", "133", "priority", "32765", "protocol", "245",
           ns=lab6.peer)
        sh("ip", *ip, "route", "add", "local", "default", "dev", "lo", "table", "133", "proto", "245",
           "scope", "host", ns=lab6.peer)
    sh("ip", "addr", "add", "::6/128", "dev", "lo", ns=lab6.peer)
    call_in(lab6.pod, _change_all, True)
    assert _routing_state(lab6.pod) == _routing_state(lab6.peer) != before
    # A second add is refused (no duplicate rule: the kernel would keep two), a delete leaves nothing.
    for change in (lambda: rtnl.change_rule(True, socket.AF_INET, 1337, 133, 32765, 245),
                   lambda: rtnl.change_address(True, socket.if_nametoindex("lo"), "::6", 128)):
        try:
            call_in(lab6.pod, change)
        except RuntimeError as exc:
            assert "File exists" in str(exc)
        else:
            raise AssertionError("adding what exists must be refused")
    call_in(lab6.pod, _change_all, False)
    assert _routing_state(lab6.pod) == before
