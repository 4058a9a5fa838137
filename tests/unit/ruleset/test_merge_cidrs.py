"""merge_cidrs is collapse_addresses, only faster and on Prefix values, and a set's prefixes are spelled in JSON
as the ipaddress networks were: checked against the standard library on random input."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.config.values import Prefix, parse_cidr
from interceptd.ruleset.nftjson import elements_json
from interceptd.ruleset.render import merge_cidrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

v4 = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
               st.integers(0, 2**32 - 1), st.integers(0, 32))
v6 = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
               st.integers(0, 2**128 - 1) | st.integers(0, 2**16), st.integers(0, 128))


@settings(max_examples=400, deadline=None)
@given(st.lists(v4, max_size=40), st.lists(v6, max_size=20))
def test_same_as_collapse_addresses(nets4: list[ipaddress.IPv4Network], nets6: list[ipaddress.IPv6Network]) -> None:
    both = [Prefix.of(n) for n in (*nets4, *nets6)]
    for version, nets in ((4, nets4), (6, nets6)):
        want: list[Network] = list(ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]
        assert merge_cidrs(both, version) == tuple(Prefix.of(n) for n in want)
        assert [str(p) for p in merge_cidrs(both, version)] == [str(n) for n in want]  # the text too


def test_adjacent_and_nested() -> None:
    nets = [parse_cidr(n) for n in ("10.0.1.0/24", "10.0.0.0/24", "10.0.0.128/25", "192.0.2.1/32")]
    assert [str(n) for n in merge_cidrs(nets, 4)] == ["10.0.0.0/23", "192.0.2.1/32"]


@settings(max_examples=200, deadline=None)
@given(st.lists(v4, max_size=20), st.lists(v6, max_size=20))
def test_set_elements_are_spelled_as_libnftables_json_spells_them(nets4: list[ipaddress.IPv4Network],
                                                                  nets6: list[ipaddress.IPv6Network]) -> None:
    """A host prefix is its address alone, any other an addr/len pair: from the Prefix's own text, as ipaddress
    writes the network address."""
    for nets in (nets4, nets6):
        elements = tuple(Prefix.of(n) for n in nets)
        assert elements_json.__wrapped__(elements) == [
            str(n.network_address) if n.prefixlen == n.max_prefixlen
            else {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets]
