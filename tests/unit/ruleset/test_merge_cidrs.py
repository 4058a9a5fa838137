"""merge_cidrs is collapse_addresses, only faster: checked against the standard library on random input."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.ruleset.render import merge_cidrs

v4 = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
               st.integers(0, 2**32 - 1), st.integers(0, 32))
v6 = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
               st.integers(0, 2**128 - 1) | st.integers(0, 2**16), st.integers(0, 128))


@settings(max_examples=400, deadline=None)
@given(st.lists(v4, max_size=40), st.lists(v6, max_size=20))
def test_same_as_collapse_addresses(nets4: list[ipaddress.IPv4Network], nets6: list[ipaddress.IPv6Network]) -> None:
    both = [*nets4, *nets6]
    assert merge_cidrs(both, 4) == tuple(ipaddress.collapse_addresses(nets4))
    assert merge_cidrs(both, 6) == tuple(ipaddress.collapse_addresses(nets6))


def test_adjacent_and_nested() -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.1.0/24", "10.0.0.0/24", "10.0.0.128/25", "192.0.2.1/32")]
    assert [str(n) for n in merge_cidrs(nets, 4)] == ["10.0.0.0/23", "192.0.2.1/32"]
