"""CIDR lists read dotted IPv4 prefixes with inet_pton into Prefix values (no ipaddress objects):
they must accept and refuse exactly what parsing each item with the ipaddress module does, for any spelling
near an IPv4 or IPv6 prefix, and each Prefix must hold that network's version, integer, length and text."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.config.values import Prefix, parse_cidr, parse_cidrs, parse_include_cidrs, split_list

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget
REFUSED = "refused"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def by_ipaddress(text: str) -> Network | str:
    """One item as parse_cidr read every item before lists had their own fast path."""
    if text != text.strip() or text == "" or "*" in text or "%" in text:
        return REFUSED
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return REFUSED


def item_by_item(text: str) -> tuple[Network | str, ...] | str:
    items = tuple(by_ipaddress(item) for item in split_list(text))
    return REFUSED if REFUSED in items else items


def as_list(text: str) -> tuple[Prefix, ...] | str:
    try:
        return parse_include_cidrs(text) or ()
    except ValueError:
        return REFUSED


# Mostly numbers a dotted address may hold, often with a leading zero (which ipaddress refuses) or too big.
_NUMBER = st.one_of(st.integers(0, 255).map(str), st.integers(0, 255).map(str), st.integers(0, 300).map(str),
                    st.integers(0, 99).map(lambda n: f"0{n}"),
                    st.sampled_from(["", "00", "1e2", "+1", "-1", "\u0661", " 1", "1\x00", "0x1", "\t1"]))
_NEAR_IPV4 = st.builds(lambda octets, tail: ".".join(octets) + tail,
                       st.sampled_from([4, 4, 4, 3, 5]).flatmap(lambda n: st.lists(_NUMBER, min_size=n, max_size=n)),
                       st.one_of(st.just(""), _NUMBER.map(lambda n: f"/{n}"),
                                 st.sampled_from(["/255.255.0.0", "/0.0.255.255", "/", "/32\n", " /8", "/8 "])))


def as_ipaddress(prefix: Prefix) -> Network:
    """The network a Prefix stands for, from its integer, checked against the text it carries."""
    cls = ipaddress.IPv4Network if prefix.version == 4 else ipaddress.IPv6Network
    net = cls((prefix.value, prefix.prefixlen))  # strict: host bits set would raise
    assert prefix.max_prefixlen == net.max_prefixlen
    assert prefix.address == str(net.network_address) and str(prefix) == str(net)
    assert prefix.last == int(net.broadcast_address)
    return net


_NEAR_IPV6 = st.builds(lambda groups, tail: ":".join(groups) + tail,
                       st.lists(st.sampled_from(["", "0", "db8", "2001", "ffff", "00001", "g", "1.2.3.4"]),
                                min_size=2, max_size=9),
                       st.one_of(st.just(""), st.integers(0, 130).map(lambda n: f"/{n}"), st.just("%eth0")))


@settings(max_examples=3000 * SCALE)
@given(st.one_of(st.lists(_NEAR_IPV4, max_size=3).map(",".join), st.lists(_NEAR_IPV6, max_size=3).map(",".join),
                 st.text(alphabet="0123456789abcdef./:, \n", max_size=20)))
def test_a_cidr_list_is_ipaddress_item_by_item(text: str) -> None:
    got, want = as_list(text), item_by_item(text)
    if got == REFUSED or want == REFUSED:
        assert got == want, text
        return
    assert all(type(n) is Prefix for n in got), text
    assert tuple(as_ipaddress(n) for n in got) == want, text
    assert parse_cidrs(text) == got  # -x reads a list as -i does


@settings(max_examples=3000 * SCALE)
@given(st.one_of(_NEAR_IPV4, _NEAR_IPV6, st.text(alphabet="0123456789abcdef./: \n", max_size=20)))
def test_one_cidr_is_ipaddress(text: str) -> None:
    # parse_cidr reads a default (127.0.0.1/32) or a dotted item written as ipaddress writes it by itself.
    try:
        got: Network | str = as_ipaddress(parse_cidr(text))
    except ValueError:
        got = REFUSED
    assert got == by_ipaddress(text), text


@pytest.mark.parametrize("text", ["198.51.100.7/24", "0.0.0.0/0", "255.255.255.255", "10.0.0.1/8", "192.0.2.0/32"])
def test_host_bits_are_dropped_as_istio_does(text: str) -> None:
    assert parse_cidrs(text) == (parse_cidr(text),)
    assert as_ipaddress(parse_cidr(text)) == ipaddress.ip_network(text, strict=False)


@pytest.mark.parametrize("text", ["01.2.3.4", "1.2.3.256", "1.2.3.4/33", "1.2.3", "1.2.3.4/", "1.2.3.4 "])
def test_what_ipaddress_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a CIDR"):
        parse_cidrs(text)


def test_a_prefix_is_a_frozen_value() -> None:
    a, b = parse_cidr("10.0.0.1/8"), parse_cidr("10.0.0.0/8")
    assert a == b and hash(a) == hash(b) and a != parse_cidr("10.0.0.0/9") and a != parse_cidr("::a00:0/8")
    assert a != ipaddress.ip_network("10.0.0.0/8")  # never equal to a look-alike of another type
    assert len({a, b, parse_cidr("10.0.0.0/16")}) == 2
    with pytest.raises(AttributeError):
        a.prefixlen = 9  # type: ignore[misc]
    assert ipaddress.ip_address("10.255.255.255") in a and ipaddress.ip_address("11.0.0.0") not in a
    assert ipaddress.ip_address("10.0.0.1") not in parse_cidr("::a00:0/104")  # another version: never inside
    assert (parse_cidr("192.0.2.1").json(), parse_cidr("192.0.2.1/24").json()) == \
        ("192.0.2.1", {"prefix": {"addr": "192.0.2.0", "len": 24}})
    assert (parse_cidr("2001:db8::1").nft_text(), parse_cidr("2001:DB8::1/32").nft_text()) == \
        ("2001:db8::1", "2001:db8::/32")
