"""The host probe table (ruleset.hostprobe): its rules, the snat statement in every translation, explain's walk
through postrouting, and the element changes that follow the node's pods."""

from __future__ import annotations

import ipaddress

import pytest

from interceptd import records
from interceptd.config import load
from interceptd.errors import KernelRefusedError
from interceptd.ruleset import names as N
from interceptd.ruleset.explain import Connection, explain
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.hostprobe import render_host
from interceptd.ruleset.model import Hook, Ruleset, Snat
from interceptd.ruleset.nftjson import Existing, normalise, transaction, update
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.nfttext import ruleset_text
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel


def _host(*pods: str, **settings: str) -> Ruleset:
    return render_host(load(settings, {}), [ipaddress.ip_address(p) for p in pods])


def test_one_snat_rule_per_family_on_the_kubelets_uid_and_the_pods_sets() -> None:
    ruleset = _host("192.0.2.11", "192.0.2.10", "2001:db8::10", "192.0.2.10", kubelet_uid="1000")
    assert ruleset.table == N.HOST_TABLE
    (chain,) = ruleset.chains
    assert chain.hook == Hook("nat", "postrouting", 100)
    assert [r.name for r in chain.rules] == [N.ENTRY, N.RULE_PROBE_SNAT, "probe-snat-v6"]
    assert chain.rules[1].actions == (Snat("ip", "169.254.7.127"),)
    assert chain.rules[2].actions == (Snat("ip6", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),)
    assert "meta skuid 1000 ip daddr @probe-pods-v4" in ruleset_text(ruleset)
    assert [str(e) for e in ruleset.set("probe-pods-v4").elements] == ["192.0.2.10/32", "192.0.2.11/32"]
    assert [str(e) for e in ruleset.set("probe-pods-v6").elements] == ["2001:db8::10/128"]


def test_the_kernels_listing_parses_back_to_the_same_ruleset() -> None:
    ruleset = _host("192.0.2.10", "2001:db8::10")
    kernel = FakeKernel()
    kernel.apply(transaction(ruleset, Existing.empty()))
    listing = kernel.list_table(N.HOST_TABLE)
    assert listing is not None
    parsed = parse_listing(N.HOST_TABLE, listing)
    strip = [records.replace(c, rules=tuple(records.replace(r, why="") for r in c.rules))
             for c in ruleset.chains]
    assert parsed.chains == tuple(strip) and parsed.sets == ruleset.sets


def test_the_fake_refuses_snat_outside_nat_postrouting_as_the_kernel_does() -> None:
    ruleset = _host("192.0.2.10")
    (chain,) = ruleset.chains
    wrong = records.replace(ruleset, chains=(records.replace(chain, hook=Hook("nat", "prerouting", -100)),))
    with pytest.raises(KernelRefusedError, match="snat in chain postrouting"):
        FakeKernel().apply(transaction(wrong, Existing.empty()))


@pytest.mark.parametrize(("uid", "verdict"), [(0, "snat"), (1000, "none")])
def test_explain_walks_a_probe_through_postrouting(uid: int, verdict: str) -> None:
    ruleset = _host("192.0.2.10")
    conn = Connection("outbound", "tcp", ipaddress.ip_address("192.0.2.10"), 8080, ipaddress.ip_address("192.0.2.1"),
                      uid=uid, gid=uid, oif="eth0")
    result = explain(ruleset, conn)
    assert result.verdict.action == verdict
    if uid == 0:
        assert result.verdict.rule == "postrouting/probe-snat" and "from 169.254.7.127" in result.verdict.text
    assert [s.reason.split(":")[0] for s in result.steps if s.kind == "hook"] == ["output", "postrouting"]


def test_explain_of_a_pod_table_has_no_postrouting_step() -> None:
    ruleset = render(load({"capture_mode": "ambient"}, {}), HostFacts(ipv6=False, host_ip=None))
    conn = Connection("outbound", "tcp", ipaddress.ip_address("198.51.100.7"), 80, ipaddress.ip_address("192.0.2.2"),
                      uid=1000, gid=1000, oif="eth0")
    assert "postrouting" not in [s.chain for s in explain(ruleset, conn).steps if s.kind == "hook"]


def test_pods_coming_and_going_delete_what_went_and_add_what_came_and_nothing_else() -> None:
    old, new = _host("192.0.2.10", "192.0.2.11"), _host("192.0.2.11", "192.0.2.12", "2001:db8::12")
    kernel = FakeKernel()
    kernel.apply(transaction(old, Existing.empty()))
    listing = kernel.list_table(N.HOST_TABLE) or []
    assert update(old, _host("192.0.2.10", kubelet_uid="7"), listing) is not None  # a changed rule: replaced
    ref = {"family": "inet", "table": N.HOST_TABLE}
    changes = update(old, new, listing)
    assert changes == {"nftables": [
        {"delete": {"element": {**ref, "name": "probe-pods-v4", "elem": ["192.0.2.10"]}}},
        {"add": {"element": {**ref, "name": "probe-pods-v4", "elem": ["192.0.2.12"]}}},
        {"add": {"element": {**ref, "name": "probe-pods-v6", "elem": ["2001:db8::12"]}}}]}
    kernel.apply(changes)
    fresh = FakeKernel()
    fresh.apply(transaction(new, Existing.empty()))
    assert normalise(kernel.list_table(N.HOST_TABLE) or []) == normalise(fresh.list_table(N.HOST_TABLE) or [])
    with pytest.raises(KernelRefusedError, match="No such file"):  # an element to delete is gone: refused whole
        kernel.apply(changes)
