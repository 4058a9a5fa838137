"""Pre-flight checks for `apply`: a clear error naming what is missing instead of a refused transaction.

Users of istio-init hit "unable to initialize table 'nat'" (a missing nf_nat or xt_REDIRECT module, or
the wrong iptables flavour) and had to guess which module to load. Here each kernel feature the configuration
needs is probed on its own, in libnftables' check mode (the kernel validates, nothing is committed), so the
error names the feature and the modules that provide it. Unknown user and group names and over-long interface
names are refused earlier, while the configuration is parsed (config.options, config.values).
"""

from __future__ import annotations

import re

from interceptd.config import Config
from interceptd.errors import KernelRefusedError, PreflightError
from interceptd.records import record
from interceptd.ruleset.nftjson import Json

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # Probe is a plain class at run time, a protocol for mypy

# Istio's own minimum for its nftables backend; interceptd is tested with 1.0.6.
MIN_LIBNFTABLES = (1, 0, 1)
PROBE_TABLE = "interceptd-preflight"  # never committed: check mode only


class Probe(Protocol):
    def version(self) -> str: ...

    def check(self, document: Json) -> None:
        """Validate the document in check mode; raise KernelRefusedError if it would be refused."""


@record
class Feature:
    name: str
    modules: str  # what provides it, for the error message
    hook: tuple[str, str, int]  # chain type, hook, priority
    expr: tuple[Json, ...]


def _match(left: Json, right: Any) -> Json:
    return {"match": {"op": "==", "left": left, "right": right}}


TCP = _match({"meta": {"key": "l4proto"}}, "tcp")
NAT = Feature("NAT (redirect)", "nf_nat, nft_chain_nat, nft_redirect", ("nat", "output", -100),
              (TCP, {"redirect": {"port": 15001}}))
OWNER = Feature("socket owner matching (meta skuid/skgid)", "nf_tables (nft_meta)", ("filter", "output", -100),
                (_match({"meta": {"key": "skuid"}}, 0), _match({"meta": {"key": "skgid"}}, 0), {"accept": None}))
CONNTRACK = Feature("conntrack state and marks", "nf_conntrack, nft_ct", ("filter", "prerouting", -150),
                    (_match({"ct": {"key": "state"}}, "invalid"),
                     {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}))
ZONES = Feature("conntrack zones (DNS capture)", "nf_conntrack, nft_ct", ("filter", "output", -300),
                (_match({"payload": {"protocol": "udp", "field": "dport"}}, 53),
                 {"mangle": {"key": {"ct": {"key": "zone"}}, "value": 1}}))


def _tproxy(family: str) -> Feature:
    daddr = "127.0.0.1" if family == "ip" else "::1"
    return Feature(f"TPROXY ({'IPv4' if family == 'ip' else 'IPv6'})", "nft_tproxy, nf_tproxy_ipv4/ipv6",
                   ("filter", "prerouting", -150),
                   (TCP, {"match": {"op": "!=", "left": {"payload": {"protocol": family, "field": "daddr"}},
                                    "right": daddr}},
                    {"tproxy": {"family": family, "port": 15006}}, {"mangle": {"key": {"meta": {"key": "mark"}},
                                                                                "value": 1337}}))


def needed(config: Config, ipv6: bool) -> list[Feature]:
    features = [NAT, OWNER]
    if config.tproxy or config.drop_invalid:
        features.append(CONNTRACK)
    if config.tproxy:
        features += [_tproxy("ip"), *([_tproxy("ip6")] if ipv6 else [])]
    if config.redirect_dns:
        features.append(ZONES)
    return features


def document(features: list[Feature]) -> Json:
    """One check-mode transaction probing the features, each in a base chain of its own."""
    cmds: list[Json] = [{"add": {"table": {"family": "inet", "name": PROBE_TABLE}}}]
    for n, feature in enumerate(features):
        where = {"family": "inet", "table": PROBE_TABLE}
        cmds.append({"add": {"chain": {**where, "name": f"probe{n}", "type": feature.hook[0],
                                       "hook": feature.hook[1], "prio": feature.hook[2], "policy": "accept"}}})
        cmds.append({"add": {"rule": {**where, "chain": f"probe{n}", "expr": list(feature.expr)}}})
    return {"nftables": cmds}


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_version(probe: Probe) -> str:
    """Refuse a libnftables older than Istio's minimum (one listing of table names: well under a
    millisecond, so `apply` asks before every transaction); returns the version."""
    version = probe.version()
    if parse_version(version) < MIN_LIBNFTABLES:
        wanted = ".".join(map(str, MIN_LIBNFTABLES))
        raise PreflightError(f"libnftables {version} is too old: interceptd needs {wanted} or newer "
                             "(Debian 12's nftables and python3-nftables packages have 1.0.6)")
    return version


def run(config: Config, ipv6: bool, probe: Probe) -> None:
    """Raise PreflightError naming the first thing missing; return quietly when all is there.

    A check-mode transaction with base chains costs the kernel an RCU grace period when it aborts (10-20 ms,
    most of a one-shot apply), so `apply` runs this only after its own transaction was refused, which
    changed nothing either: the error then names the missing feature all the same.
    """
    version = check_version(probe)
    features = needed(config, ipv6)
    try:
        probe.check(document(features))  # the usual case: one transaction, all there
        return
    except KernelRefusedError:
        pass
    for feature in features:  # something is missing: find out what, one feature at a time
        try:
            probe.check(document([feature]))
        except KernelRefusedError as exc:
            reason = str(exc).rpartition(": ")[2] or str(exc)
            if "Could not process" in str(exc) or "Operation not supported" in str(exc):
                raise PreflightError(f"the kernel lacks {feature.name} support (modules: {feature.modules}); "
                                     f"nothing was changed: {reason}") from None
            raise PreflightError(f"libnftables {version} cannot express {feature.name}; it is too old or "
                                 f"built without it: {reason}") from None
