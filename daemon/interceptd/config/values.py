"""Parsers for option values, shared by flags, environment variables and TOML keys.

Each parser takes the text form istio-iptables uses and returns a typed value or raises ValueError with a
short reason; the caller adds which flag, variable or key it came from.
"""

from __future__ import annotations

import functools
import grp
import pwd
import re
from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton  # the C module under socket, not socket.py

from interceptd.records import FrozenRecordError, record

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    import ipaddress

# Limits on hostile or mistaken input. Without them 1,000,000 excluded CIDRs took 23 s and 1.1 GB to render
# and the agent never became ready. Raw items are counted before any parsing, so parsing itself is bounded;
# a set may hold more raw items than elements because overlapping and adjacent entries are merged.
MAX_LIST_ITEMS = 200_000
MAX_SET_ELEMENTS = 100_000
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a TOML file or a CNI request: room for MAX_LIST_ITEMS IPv6 CIDRs
MIN_RECONCILE_INTERVAL = 0.1  # seconds; a shorter period is a busy loop, not a backstop
MAX_SECONDS = 86400

_BOOL_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_BOOL_FALSE = {"0", "f", "F", "false", "FALSE", "False"}
# Patterns are used with fullmatch (a `$` would also accept a trailing newline).
_ID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes other scripts' digits
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@functools.cache
def _ifname() -> re.Pattern[str]:
    """Compiled at the first interface name: the seed's command line (`-i '*'`, `-x ""`) has none."""
    # Linux dev_valid_name(): 1..15 bytes, not "." or "..", no '/', ':' or white space. Quotes and other
    # characters nft's parser would choke on are refused too, so a name can never smuggle syntax.
    # libnftables reads a leading '@' as a set reference, '$' as a variable and a trailing '*' as a wildcard.
    return re.compile(r"[A-Za-z0-9_.+-]{1,15}")


_MAX_PREFIXLEN = {4: 32, 6: 128}


class Prefix:
    """An IPv4 or IPv6 prefix, as a CIDR list item, a set element or a match value: its version, its network as
    an integer, its length and its address text, each found once, when the item is parsed. Not ipaddress'
    network objects: at 10,000 CIDRs, in the fresh process a one-shot command is, building them took 20 ms,
    their str() in the transaction 10 ms more, and merging needs only the integers. Frozen and equal by value,
    like a record; a hand-written class because a record's generic __init__ would cost as much as the objects
    it replaces."""

    __slots__ = ("address", "prefixlen", "value", "version")
    version: int  # 4 or 6
    value: int  # the network address as an integer: host bits are zero
    prefixlen: int
    address: str  # the network address as ipaddress writes it ("10.0.0.0", "2001:db8::")

    def __init__(self, version: int, value: int, prefixlen: int, address: str) -> None:
        # The slots' own setters: __setattr__ refuses every assignment, and object.__setattr__ by name costs a
        # tenth more of a list item's parse.
        _set_version(self, version)
        _set_value(self, value)
        _set_prefixlen(self, prefixlen)
        _set_address(self, address)

    @staticmethod
    def of(net: ipaddress.IPv4Network | ipaddress.IPv6Network | ipaddress.IPv4Address | ipaddress.IPv6Address,
           ) -> Prefix:
        """The prefix of an ipaddress network, or the host prefix of an address."""
        import ipaddress  # imported by whoever made `net`: a lookup here

        if isinstance(net, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return Prefix(net.version, int(net), net.max_prefixlen, str(net))
        return Prefix(net.version, int(net.network_address), net.prefixlen, str(net.network_address))

    @staticmethod
    def from_int(version: int, value: int, prefixlen: int) -> Prefix:
        """The prefix of `prefixlen` bits at `value` (whose host bits must be zero)."""
        return Prefix(version, value, prefixlen, ip_text(value.to_bytes(4 if version == 4 else 16, "big")))

    @property
    def max_prefixlen(self) -> int:
        return _MAX_PREFIXLEN[self.version]

    @property
    def last(self) -> int:
        """The highest address in the prefix, as an integer."""
        return self.value | ((1 << (_MAX_PREFIXLEN[self.version] - self.prefixlen)) - 1)

    @property
    def network_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        import ipaddress  # explain's and the host table's, not an apply's

        return ipaddress.IPv4Address(self.value) if self.version == 4 else ipaddress.IPv6Address(self.value)

    def json(self) -> str | dict[str, dict[str, str | int]]:
        """The element as libnftables JSON writes it: a host prefix is its address alone."""
        if self.prefixlen == _MAX_PREFIXLEN[self.version]:
            return self.address
        return {"prefix": {"addr": self.address, "len": self.prefixlen}}

    def nft_text(self) -> str:
        """The element as nft writes it: a host prefix is its address alone."""
        return self.address if self.prefixlen == _MAX_PREFIXLEN[self.version] else str(self)

    def __contains__(self, address: object) -> bool:
        """Does the ipaddress address lie in this prefix (an address of the other version never does)?"""
        import ipaddress  # explain's, not an apply's

        return (isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
                and address.version == self.version and self.value <= int(address) <= self.last)

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    def __repr__(self) -> str:
        return f"Prefix({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prefix):
            return NotImplemented
        return self.value == other.value and self.prefixlen == other.prefixlen and self.version == other.version

    def __hash__(self) -> int:
        return hash(self.value) ^ self.prefixlen

    def __setattr__(self, field: str, value: object) -> None:
        raise FrozenRecordError(f"cannot assign to field {field!r} of Prefix")

    def __delattr__(self, field: str) -> None:
        raise FrozenRecordError(f"cannot delete field {field!r} of Prefix")


_set_version, _set_value, _set_prefixlen, _set_address = (
    vars(Prefix)[field].__set__ for field in ("version", "value", "prefixlen", "address"))
IPNetwork = Prefix  # the name the model and the configuration use for a CIDR


def address_value(text: str) -> tuple[int, int] | None:
    """The version and integer of an address written the way ipaddress writes it (which ipaddress reads as
    that address), found without importing ipaddress; None for any other text, for ipaddress to read or refuse.
    The defaults, and the usual values, of the options that take an address are written so."""
    version = 6 if ":" in text else 4
    try:
        packed = inet_pton(AF_INET6 if version == 6 else AF_INET, text)
    except (OSError, ValueError):
        return None
    return (version, int.from_bytes(packed, "big")) if ip_text(packed) == text else None


def ip_text(packed: bytes) -> str:
    """An address's 4 or 16 bytes as ipaddress writes them, without importing ipaddress (an init container's
    apply reads the namespace's addresses as bytes). inet_ntop writes what ipaddress does (RFC 5952) but for
    ::/96 and ::ffff:0:0/96, which glibc writes with a dotted IPv4 tail: ipaddress writes those."""
    if len(packed) == 4:
        return inet_ntop(AF_INET, packed)
    text = inet_ntop(AF_INET6, packed)
    if "." not in text:
        return text
    import ipaddress

    return str(ipaddress.IPv6Address(packed))


@record(order=True)
class PortRange:
    """A port or an inclusive range of ports ("8000-9000" is accepted, as nft accepts it in Istio)."""

    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last


def split_list(text: str) -> list[str]:
    """istio-iptables list syntax: split on ',', drop empty elements, no trimming."""
    return [item for item in text.split(",") if item != ""]


def parse_bool(text: str) -> bool:
    if text in _BOOL_TRUE:
        return True
    if text in _BOOL_FALSE:
        return False
    raise ValueError("not a boolean (use true or false)")


def parse_port(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError("not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError("port out of range 1-65535")
    return port


def parse_port_range(text: str) -> PortRange:
    first, sep, last = text.partition("-")
    if not sep:
        port = parse_port(text)
        return PortRange(port, port)
    lo, hi = parse_port(first), parse_port(last)
    if lo > hi:
        raise ValueError("port range is reversed")
    return PortRange(lo, hi)


def parse_ports(text: str) -> tuple[PortRange, ...]:
    return tuple(parse_port_range(item) for item in split_list(text))


def parse_inbound_ports(text: str) -> tuple[PortRange, ...] | None:
    """`*` (every port: returned as None) or a port list; `*` must be the whole value."""
    if text == "*":
        return None
    if "*" in text:
        raise ValueError("'*' must be the whole value")
    return parse_ports(text)


# A prefix length as ipaddress writes it: a lookup instead of an int() per item; any other text (a netmask,
# "08") is not in it and goes to ipaddress.
_LENGTH = {str(n): n for n in range(129)}


def parse_cidr(text: str) -> IPNetwork:
    # ipaddress accepts IPv6 zone ids ("fe80::1%eth0/128"): a zone has no meaning in a set of prefixes.
    if text != text.strip() or text == "" or "*" in text or "%" in text:
        raise ValueError(f"{text!r} is not a CIDR")
    # The spelling ipaddress writes (the defaults', the kernel's listing's) is read without importing ipaddress.
    address, slash, length = text.partition("/")
    plain = address_value(address)
    if plain is not None:
        version, value = plain
        bits = _MAX_PREFIXLEN[version]
        prefixlen = _LENGTH.get(length, bits + 1) if slash else bits
        if prefixlen <= bits:
            network = value >> (bits - prefixlen) << (bits - prefixlen)
            return (Prefix(version, value, prefixlen, address) if network == value
                    else Prefix.from_int(version, network, prefixlen))
    import ipaddress

    try:
        # Host bits are allowed, as in Istio (10.0.0.1/8 means 10.0.0.0/8).
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR") from None
    return Prefix.of(net)


def _cidr_items(text: str) -> tuple[IPNetwork, ...]:
    """parse_cidr for each item of a list, which can be 200,000 items long: a dotted IPv4 prefix is read by
    inet_pton into a Prefix, without ipaddress' octet-by-octet parsing and objects (at 10,000 CIDRs ~25 ms less);
    any other spelling (IPv6, a netmask after the '/', "/08", a bad one) is parse_cidr's to accept or refuse.
    inet_pton takes exactly the dotted quads ipaddress takes (no leading zeros, no short forms, no white space),
    which the hypothesis test of the two holds it to."""
    out: list[IPNetwork] = []
    for item in split_list(text):
        dotted, slash, length = item.partition("/")
        prefixlen = _LENGTH.get(length, 33) if slash else 32
        try:
            packed = inet_pton(AF_INET, dotted) if prefixlen <= 32 else None
        except (OSError, ValueError):  # not a dotted quad (ValueError: a NUL in it)
            packed = None
        if packed is None:
            out.append(parse_cidr(item))
            continue
        address = int.from_bytes(packed)
        host_bits = 32 - prefixlen
        network = address >> host_bits << host_bits
        # The text as written is the canonical one (inet_pton takes no leading zeros) unless host bits were dropped.
        out.append(Prefix(4, network, prefixlen, dotted if network == address else ip_text(network.to_bytes(4, "big"))))
    return tuple(out)


def parse_cidrs(text: str) -> tuple[IPNetwork, ...]:
    if text.strip() == "*":
        raise ValueError("'*' is not allowed here (it would exclude every destination)")
    return _cidr_items(text)


def parse_include_cidrs(text: str) -> tuple[IPNetwork, ...] | None:
    """`*` (every destination: returned as None) or a CIDR list."""
    if text == "*":
        return None
    return _cidr_items(text)


def parse_ifname(text: str) -> str:
    if not _ifname().fullmatch(text) or text in (".", ".."):
        raise ValueError(f"{text!r} is not a valid interface name (1-15 characters of A-Z a-z 0-9 _ . - +)")
    return text


def parse_ifnames(text: str) -> tuple[str, ...]:
    return tuple(parse_ifname(item) for item in split_list(text))


def parse_id_name(text: str) -> str:
    """A user or group name or number; a name is resolved later, against the right database."""
    if not (_DIGITS.fullmatch(text) or _ID_NAME.fullmatch(text)):
        raise ValueError(f"{text!r} is neither a number nor a valid name")
    if _DIGITS.fullmatch(text) and int(text) > 0xFFFFFFFE:
        raise ValueError(f"{text!r} is out of range")
    return text


def parse_id_names(text: str) -> tuple[str, ...]:
    return tuple(parse_id_name(item) for item in split_list(text))


def resolve_uid(name: str) -> int:
    if _DIGITS.fullmatch(name):
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {name!r}") from None


def resolve_gid(name: str) -> int:
    if _DIGITS.fullmatch(name):
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {name!r}") from None


def parse_mode(text: str) -> str:
    """Istio treats every value but TPROXY as REDIRECT; interceptd refuses anything else."""
    if text in ("", "REDIRECT"):
        return "REDIRECT"
    if text == "TPROXY":
        return "TPROXY"
    raise ValueError("unknown interception mode (use REDIRECT or TPROXY)")


def parse_u32(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError("not a decimal number")
    value = int(text)
    if not 1 <= value <= 0xFFFFFFFF:
        raise ValueError("out of range 1-4294967295")
    return value


def parse_uid(text: str) -> int:
    """A numeric user id; 4294967295 is (uid_t)-1, "no user", which no socket has."""
    if not _DIGITS.fullmatch(text) or int(text) >= 0xFFFFFFFF:
        raise ValueError("not a user id 0-4294967294")
    return int(text)


def parse_route_table(text: str) -> int:
    value = parse_u32(text)
    if value in (253, 254, 255):
        raise ValueError("tables 253-255 are the kernel's default, main and local tables")
    return value


def parse_uint16(text: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > 65535:
        raise ValueError("not a number 0-65535")
    return int(text)


def parse_duration(text: str) -> float:
    """Go duration syntax ("5s", "1m30s", "250ms"), in seconds."""
    pos, total = 0, 0.0
    for part in _DURATION_PART.finditer(text):
        if part.start() != pos:
            break
        total += float(part.group(1)) * _DURATION_UNIT[part.group(2)]
        pos = part.end()
    if pos != len(text) or not text:
        raise ValueError("not a duration (e.g. 5s, 1m30s, 250ms)")
    return total


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = parse_duration(text)
    if not MIN_RECONCILE_INTERVAL <= value <= MAX_SECONDS:
        raise ValueError(f"must be from {MIN_RECONCILE_INTERVAL} to {MAX_SECONDS} seconds (a number or a "
                         "duration such as 500ms, 10s, 5m)")
    return value


def parse_loopback_cidr(text: str) -> Prefix:
    net = parse_cidr(text)
    if net.version != 4 or net.value >> 24 != 127 or not 8 <= net.prefixlen <= 32:
        raise ValueError("must be an IPv4 loopback prefix with a mask of 8 to 32")
    return net


def parse_owner_groups(text: str) -> tuple[str, ...] | None:
    """`*` (every group: None) or a list of group names/numbers; an empty list is kept (Istio's quirk)."""
    if text == "*":
        return None
    return parse_id_names(text)


def parse_iptables_binary(text: str) -> str:
    if text not in ("", "legacy", "nft"):
        raise ValueError("must be '', 'legacy' or 'nft'")
    return text


def parse_table_name(text: str) -> str:
    if not _TABLE_NAME.fullmatch(text):
        raise ValueError("must start with a letter and hold only letters, digits, '_' and '-' (max 64)")
    return text


def parse_log_level(text: str) -> str:
    level = text.lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return level


def parse_log_format(text: str) -> str:
    if text not in ("auto", "json", "console"):
        raise ValueError("must be auto, json or console")
    return text


def parse_address(text: str) -> tuple[str, int] | None:
    """HOST:PORT or [V6]:PORT, for the metrics listener; an empty text turns the listener off."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if address_value(host) is None:
        import ipaddress

        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"{host!r} is not an IP address") from None
            host = "127.0.0.1"
    return host, parse_port(port)


def parse_path(text: str) -> str:
    if not text or "\0" in text:
        raise ValueError("not a path")
    return text


def parse_optional_path(text: str) -> str:
    """A path, or '' for "none"."""
    return parse_path(text) if text else ""


def parse_text(text: str) -> str:
    return text


CAPTURE_MODES = ("sidecar", "ambient")


def parse_capture_mode(text: str) -> str:
    """sidecar: istio-iptables' rules for a pod with its own proxy; ambient: istio-cni's in-pod rules that send
    the pod's traffic to a node proxy listening inside the pod's namespace."""
    if text not in CAPTURE_MODES:
        raise ValueError("unknown capture mode (use sidecar or ambient)")
    return text


def parse_mark(text: str) -> int:
    """A packet or conntrack mark, decimal or 0x-hex (Istio writes its ambient marks in hex: 0x539, 0xfff)."""
    hexa = text[:2] in ("0x", "0X")
    body = text[2:] if hexa else text
    # Not a regex for the hex digits: the seed's marks are parsed at every start, a pattern compiled for it too.
    if not body or (body.strip("0123456789abcdefABCDEF") if hexa else not _DIGITS.fullmatch(body)):
        raise ValueError("not a number (decimal or 0x-hex)")
    value = int(body, 16 if hexa else 10)
    if not 1 <= value <= 0xFFFFFFFF:
        raise ValueError("out of range 1-0xffffffff")
    return value


def parse_ipv4_host(text: str) -> Prefix:
    """An IPv4 address, as its host prefix (/32)."""
    return _parse_host(4, text)


def parse_ipv6_host(text: str) -> Prefix:
    """An IPv6 address, as its host prefix (/128)."""
    return _parse_host(6, text)


def _parse_host(version: int, text: str) -> Prefix:
    """Every load parses the defaults of the ambient probe addresses: a text written the way ipaddress writes
    it is taken as it is, any other is ipaddress' to accept (in its spelling: it keeps an IPv6 zone) or refuse."""
    plain = address_value(text)
    if plain is not None and plain[0] == version:
        return Prefix(version, plain[1], _MAX_PREFIXLEN[version], text)
    import ipaddress

    try:
        return Prefix.of(ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError(f"not an IPv{version} address") from None
