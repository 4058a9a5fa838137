"""parse_cidr reads dotted IPv4 prefixes itself (10,000 CIDRs a fifth faster): it must accept, refuse and
return exactly what the ipaddress module's parsing does, for any spelling near an IPv4 prefix."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.config.values import IPNetwork, parse_cidr

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget


def by_ipaddress(text: str) -> IPNetwork | None:
    """What parse_cidr returned before it read IPv4 itself (None: refused)."""
    if text != text.strip() or text == "" or "*" in text or "%" in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def by_parse_cidr(text: str) -> IPNetwork | None:
    try:
        return parse_cidr(text)
    except ValueError:
        return None


_NUMBER = st.one_of(st.integers(0, 300).map(str), st.integers(0, 300).map(lambda n: f"0{n}"),
                    st.sampled_from(["", "00", "1e2", "+1", "-1", "\u0661", " 1"]))
_NEAR_IPV4 = st.builds(lambda octets, tail: ".".join(octets) + tail,
                       st.lists(_NUMBER, min_size=3, max_size=5),
                       st.one_of(st.just(""), _NUMBER.map(lambda n: f"/{n}"),
                                 st.sampled_from(["/255.255.0.0", "/0.0.255.255", "/", "/32\n", " /8", "/8 "])))


@settings(max_examples=3000 * SCALE)
@given(st.one_of(_NEAR_IPV4, st.text(alphabet="0123456789./: \n", max_size=20)))
def test_parse_cidr_is_ipaddress_for_every_spelling(text: str) -> None:
    got, want = by_parse_cidr(text), by_ipaddress(text)
    assert got == want and type(got) is type(want), text


@pytest.mark.parametrize("text", ["198.51.100.7/24", "0.0.0.0/0", "255.255.255.255", "10.0.0.1/8", "192.0.2.0/32"])
def test_host_bits_are_dropped_as_istio_does(text: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(text, strict=False)


@pytest.mark.parametrize("text", ["01.2.3.4", "1.2.3.256", "1.2.3.4/33", "1.2.3", "1.2.3.4/", "1.2.3.4 "])
def test_what_ipaddress_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a CIDR"):
        parse_cidr(text)
