"""Hypothesis strategies for hostile configuration input: flags, environment variables and TOML.

Each option gets a mix of values that are valid for it, values valid for some other option, text that tries
to smuggle nft or shell syntax, and arbitrary text. Shared by the unit fuzz (parser never crashes) and the
integration sample (whatever parses, `nft -c` accepts).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from interceptd.config import OPTIONS, Option, options, values
from interceptd.errors import ConfigError
from interceptd.ruleset.facts import HostFacts

# derandomize: CI runs the same examples every time; `make fuzz` sets FUZZ_PROFILE=fuzz for a long random run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("fuzz", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

SMUGGLE = ['eth0"; flush ruleset; "', "a}", "a{", "x\ny", "x\ry", "'", '"', "\\", "$(reboot)", "`id`", ";",
           "# c", "@set", "eth0 ", " eth0", "\t", "é", "eth0\u202e", "a" * 16, "a" * 300, "*", "-1", "0x10",
           "1e3", "+5", "\u0663", "\u00b2", "1_0", " 80", "80 ", "80-", "-80", "8-7", "0", "65536", "4294967296",
           "::", "0.0.0.0/0", "::/0", "1.2.3.4/-1", "fe80::1%eth0", "[::1]:1", "localhost:0", "a:b:c", "..",
           ".", "", ",", ",,", "*,80", "root;id", "nobody", "root", "0", "1337", "65534", "daemon$", "a b",
           "true", "false", "TPROXY", "REDIRECT", "tproxy", "1ms", "1h1m", "0s", "nan", "inf", "-0"]

_PORT = st.integers(1, 65535).map(str)
_PORT_ITEM = st.one_of(_PORT, st.tuples(st.integers(1, 65535), st.integers(1, 65535))
                       .map(lambda t: f"{min(t)}-{max(t)}"))
_V4 = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
_V6 = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}")
_CIDR = st.one_of(_V4, _V6, st.ip_addresses().map(str))
_IFNAME = st.from_regex(r"\A[A-Za-z0-9_.+-]{1,15}\Z")
_ID = st.one_of(st.sampled_from(["root", "nobody", "daemon", "0", "1337", "65534"]), st.integers(0, 2**32).map(str))


def _csv(item: SearchStrategy[str]) -> SearchStrategy[str]:
    return st.lists(item, max_size=6).map(",".join)


_VALID: dict[str, SearchStrategy[str]] = {
    "parse_port": _PORT,
    "parse_ports": _csv(_PORT_ITEM),
    "parse_inbound_ports": st.one_of(st.just("*"), _csv(_PORT_ITEM)),
    "parse_cidrs": _csv(_CIDR),
    "parse_include_cidrs": st.one_of(st.just("*"), _csv(_CIDR)),
    "parse_ifnames": _csv(_IFNAME),
    "parse_id_names": _csv(_ID),
    "parse_owner_groups": st.one_of(st.just("*"), _csv(_ID)),
    "parse_bool": st.sampled_from(["1", "0", "t", "f", "true", "false", "TRUE", "False"]),
    "parse_mode": st.sampled_from(["", "REDIRECT", "TPROXY"]),
    "parse_u32": st.integers(0, 2**32).map(str),
    "parse_route_table": st.integers(0, 2**32).map(str),
    "parse_uint16": st.integers(0, 65536).map(str),
    "parse_duration": st.from_regex(r"\A([0-9]{1,3}(ms|s|m|h)){1,3}\Z"),
    "parse_seconds": st.one_of(st.floats(0, 90000).map(str), st.from_regex(r"\A[0-9]{1,3}(ms|s|m)\Z")),
    "parse_loopback_cidr": st.tuples(st.ip_addresses(v=4, network="127.0.0.0/8"), st.integers(0, 32))
    .map(lambda t: f"{t[0]}/{t[1]}"),
    "parse_table_name": st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,70}\Z"),
    "parse_log_level": st.sampled_from(["debug", "INFO", "warning", "error"]),
    "parse_log_format": st.sampled_from(["auto", "json", "console"]),
    "parse_iptables_binary": st.sampled_from(["", "legacy", "nft"]),
    "parse_path": st.from_regex(r"\A/[a-z0-9/._-]{0,30}\Z"),
    "parse_address": st.tuples(st.ip_addresses(), st.integers(0, 65536))
    .map(lambda t: f"[{t[0]}]:{t[1]}" if t[0].version == 6 else f"{t[0]}:{t[1]}"),
}

ANY_TEXT = st.one_of(st.sampled_from(SMUGGLE), st.text(max_size=40),
                     st.text(alphabet="0123456789,-*/.:abcdef ", max_size=30))


def value_for(option: Option, nul: bool = False, hostile: bool = True) -> SearchStrategy[str]:
    """Text for one option: mostly plausible, often hostile. Argv and environ cannot hold NUL; TOML can."""
    valid = _VALID.get(option.parse.__name__, st.text(max_size=20))
    if not hostile:
        return valid.map(lambda t: t.replace("\0", ""))
    other = st.sampled_from(sorted(_VALID)).flatmap(lambda name: _VALID[name])
    text = st.one_of(valid, valid, other, ANY_TEXT)
    return text if nul else text.map(lambda t: t.replace("\0", ""))


@st.composite
def toml_value(draw: st.DrawFn, option: Option) -> Any:
    """A TOML value of the option's kind, of another kind, or a structure TOML allows but we do not."""
    kind = draw(st.sampled_from(["text", "text", "int", "float", "bool", "list", "table"]))
    if kind == "text":
        return draw(value_for(option, nul=True))
    if kind == "int":
        return draw(st.integers(-(2**63), 2**63 - 1))
    if kind == "float":
        return draw(st.floats(allow_nan=True))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "list":
        return draw(st.lists(st.one_of(st.integers(-10, 70000), value_for(option, nul=True), st.booleans(),
                                       st.floats(0, 10)), max_size=5))
    return {"x": draw(st.integers())}


def _typed(option: Option, text: str) -> Any:
    """The TOML value a careful user would write for this text: booleans and numbers unquoted."""
    if option.kind == "bool":
        return text in ("1", "t", "T", "true", "TRUE", "True")
    if option.kind == "int" and text.isdigit():
        return int(text)
    return text


def toml_text(data: dict[str, Any]) -> str:
    """A tiny TOML writer (the stdlib only reads TOML): keys are quoted, strings JSON-escaped."""
    return "".join(f"{json.dumps(k)} = {_toml_literal(v)}\n" for k, v in data.items())


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_literal(v)}" for k, v in value.items()) + " }"


@st.composite
def inputs(draw: st.DrawFn, hostile: bool = True) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """Flags (option key -> text), environment and a TOML mapping, each setting a few options.

    hostile=False keeps to plausible values, so most examples parse (for the sample checked by nft)."""
    chosen = draw(st.lists(st.sampled_from(OPTIONS), max_size=8, unique_by=lambda o: o.key))
    flags: dict[str, str] = {}
    env: dict[str, str] = {}
    toml: dict[str, Any] = {}
    for option in chosen:
        where = draw(st.sampled_from(["flag", "env", "toml"] if option.envs else ["flag", "toml"]))
        if where == "flag":
            flags[option.key] = draw(value_for(option, hostile=hostile))
        elif where == "env":
            env[draw(st.sampled_from(option.envs))] = draw(value_for(option, hostile=hostile))
        else:
            toml[option.key] = draw(toml_value(option) if hostile else value_for(option, hostile=False)
                                    .map(lambda t, o=option: _typed(o, t)))
    if hostile and draw(st.booleans()):
        toml[draw(st.sampled_from(["nope", "envoy-port", "table.x", "", "ENVOY_PORT"]))] = 1
    return flags, env, toml


def culprit(flags: dict[str, str], env: dict[str, str], toml: dict[str, Any]) -> str:
    """What an error about these inputs must name: the one source holding the first bad value, in the order
    `config.load` reads them (option by option: TOML key, environment variables, flag), else the flag of the
    first user or group list that does not resolve. Not "some flag": the one to fix."""
    final: dict[str, Any] = {}
    for option in OPTIONS:
        final[option.key] = option.parse(option.default)
        sources: list[tuple[str, Any]] = []
        if option.key in toml:
            sources.append((f"key {option.key!r}", toml[option.key]))
        sources += [(f"environment variable {name}", env[name]) for name in option.envs if name in env]
        if option.key in flags:
            sources.append((option.flag, flags[option.key]))
        for name, value in sources:
            try:
                text = options._toml_text(option, value, "fuzz.toml") if name.startswith("key ") else value
                final[option.key] = option.parse(text)
            except (ConfigError, ValueError):
                return name
    uids = final["proxy_uid"] or (options._default_uid(final["envoy_user"]),)
    lists = [("--proxy-uid", uids, values.resolve_uid), ("--proxy-gid", final["proxy_gid"] or uids, values.resolve_gid),
             ("--outbound-owner-groups", final["outbound_owner_groups"] or (), values.resolve_gid),
             ("--outbound-owner-groups-exclude", final["outbound_owner_groups_exclude"], values.resolve_gid)]
    for flag, names, resolve in lists:
        for name in names:
            try:
                resolve(name)
            except ValueError:
                return flag
    return "(nothing: these inputs are valid)"


FACTS = [HostFacts(ipv6=True, host_ip="192.0.2.2",
                   dns_v4=(ipaddress.IPv4Address("192.0.2.53"),), dns_v6=(ipaddress.IPv6Address("2001:db8::53"),)),
         HostFacts(ipv6=False, host_ip="192.0.2.2")]

# Every string in a rendered document: names, addresses, keywords. No quote, space, brace, semicolon or
# newline can reach libnftables, whatever the input was; neither '$' (a variable), '*' (a wildcard) nor '@'
# except at the head of a reference to one of interceptd's own sets (lower-case names).
SAFE_STRING = re.compile(r"\A(@[a-z0-9-]+|[A-Za-z0-9_.:/+-]*)\Z")


def strings_in(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        # "op" holds the comparison operator (==, !=, in): the only string that is not a name or value.
        return [s for k, v in node.items() if k != "op" for s in [k, *strings_in(v)]]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return []


def _set_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["set"]["name"]} if isinstance(node.get("set"), dict) and "name" in node["set"] else set()
        return own.union(*(_set_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_set_names(v) for v in node))
    return set()


def unsafe_strings(document: Any) -> list[str]:
    """Strings of a rendered document that libnftables could read as syntax: outside SAFE_STRING, or a set
    reference ('@name') to a set the document does not define (an input that smuggled a reference in)."""
    sets = _set_names(document)
    return [s for s in strings_in(document)
            if not SAFE_STRING.match(s) or (s.startswith("@") and s[1:] not in sets)]
