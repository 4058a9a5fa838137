"""The one-shot path reads the namespace's addresses and the option defaults without the ipaddress module: the
address text written from rtnetlink's bytes, the loopback and link-local tests on integers and the address
options' values must be what ipaddress gives, for any address near the ranges those tests tell apart."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.cli.cni import pod_addresses
from interceptd.config.values import (
    Prefix,
    address_value,
    ip_text,
    parse_address,
    parse_cidr,
    parse_ipv4_host,
    parse_ipv6_host,
)
from interceptd.ruleset import render
from interceptd.ruleset.facts import is_link_local, is_link_local_multicast, is_loopback
from interceptd.system.host import decide_ipv6, eligible

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget

# Octets and groups at the edges of loopback, link-local, multicast and IPv4-embedded ranges, or any value;
# zero groups often, so that IPv6 texts have runs of every length to compress.
_OCTET = st.one_of(st.sampled_from([0, 1, 127, 128, 169, 223, 224, 239, 254, 255]), st.integers(0, 255))
_GROUP = st.one_of(st.just(0), st.sampled_from([1, 0x7F00, 0xFE80, 0xFEBF, 0xFEC0, 0xFF01, 0xFF02, 0xFF12, 0xFFF2,
                                                0xFF05, 0xFFFF, 0x0100]), st.integers(0, 0xFFFF))
V4 = st.lists(_OCTET, min_size=4, max_size=4).map(lambda octets: ipaddress.IPv4Address(bytes(octets)))
V6 = st.lists(_GROUP, min_size=8, max_size=8).map(
    lambda groups: ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups)))
ADDRESSES = st.one_of(V4, V6)


def link_local_multicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's IsLinkLocalMulticast: 224.0.0.0/24, or IPv6 multicast (ff00::/8) of link-local scope (ffX2::)."""
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.ip_network("224.0.0.0/24")
    return address.is_multicast and address.packed[1] & 0x0F == 2


def eligible_by_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """host.eligible as it read ipaddress objects: Istio skips loopback, link-local unicast and link-local
    multicast addresses."""
    return not (address.is_loopback or address.is_link_local or link_local_multicast(address))


@settings(max_examples=3000 * SCALE)
@given(ADDRESSES)
def test_address_tests_on_integers_are_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    version, value = address.version, int(address)
    assert is_loopback(version, value) == address.is_loopback
    assert is_link_local(version, value) == address.is_link_local
    assert is_link_local_multicast(version, value) == link_local_multicast(address)
    assert eligible(str(address)) == eligible_by_ipaddress(address)


@settings(max_examples=3000 * SCALE)
@given(ADDRESSES)
def test_an_address_is_written_and_read_as_ipaddress_does(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                         ) -> None:
    text = str(address)
    assert ip_text(address.packed) == text
    assert address_value(text) == (address.version, int(address))  # ipaddress' own spelling never needs it
    parse = parse_ipv4_host if address.version == 4 else parse_ipv6_host
    assert parse(text) == Prefix.of(address) and parse(text).address == text
    assert parse_address(f"[{text}]:80" if address.version == 6 else f"{text}:80") == (text, 80)


_NEAR = st.one_of(
    ADDRESSES.map(str), ADDRESSES.map(lambda a: str(a).upper()), ADDRESSES.map(lambda a: a.exploded),
    st.lists(st.sampled_from(["0", "00", "01", "1", "127", "255", "256", "ffff", "1.2.3.4", ""]), min_size=1,
             max_size=9).flatmap(lambda parts: st.sampled_from([".", ":"]).map(lambda sep: sep.join(parts))),
    V6.map(lambda a: f"{a}%eth0"), st.text(alphabet="0123456789abcdef.:%", max_size=16))


@settings(max_examples=3000 * SCALE)
@given(_NEAR)
def test_any_other_spelling_is_ipaddress_to_read_or_refuse(text: str) -> None:
    try:
        want: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(text)
    except ValueError:
        want = None
    plain = address_value(text)
    if plain is not None:
        assert want is not None and (want.version, int(want)) == plain and str(want) == text
    for version, parse in ((4, parse_ipv4_host), (6, parse_ipv6_host)):
        try:
            got: Prefix | None = parse(text)
        except ValueError:
            got = None
        assert got == (Prefix.of(want) if want is not None and want.version == version else None), text
        assert got is None or want is None or got.address == str(want)


@settings(max_examples=3000 * SCALE)
@given(_NEAR, st.one_of(st.just(""), st.sampled_from(["/", "/0", "/24", "/024", "/32", "/33", "/64", "/128", "/129",
                                                      "/255.255.255.0", "/ 8", "/\u0661"])))
def test_an_ipam_result_is_read_as_ipaddress_reads_an_interface(text: str, length: str) -> None:
    try:
        want: tuple[str, ...] = (str(ipaddress.ip_interface(text + length).ip),)
    except ValueError:
        want = ()
    assert pod_addresses({"ips": [{"address": text + length}]}) == want


def test_the_rule_constants_are_parse_cidrs() -> None:
    for constant, text in ((render.PASSTHROUGH_V4, "127.0.0.6/32"), (render.PASSTHROUGH_V6, "::6/128"),
                           (render.LOOPBACK_V4, "127.0.0.1/32"), (render.LOOPBACK_V6, "::1/128")):
        assert constant == parse_cidr(text) and constant.address == parse_cidr(text).address


def test_the_first_eligible_address_decides() -> None:
    found = ["127.0.0.1", "::1", "fe80::1", "169.254.1.1", "224.0.0.251", "ff02::fb", "2001:db8::2", "192.0.2.2"]
    assert decide_ipv6(found, dual_stack=False) == (True, "2001:db8::2")
    assert decide_ipv6(found[:6] + found[7:], dual_stack=True) == (False, "192.0.2.2")
