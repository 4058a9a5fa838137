"""`interceptd doctor` and the agent's periodic look around: read the namespace, judge, return findings.

Read-only by construction: the kernel port is only asked to list and to validate in check mode (preflight),
the rest is /proc, ioctl and `*-save` dumps (system.inspect). The judgements are ruleset.doctor's.
"""

from __future__ import annotations

from dataclasses import dataclass

from interceptd.config import Config
from interceptd.errors import HostError, PreflightError, UnexplainableError
from interceptd.ruleset import doctor
from interceptd.ruleset.doctor import Finding
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.render import render
from interceptd.ruleset.tablediff import differences
from interceptd.system import host, inspect, preflight
from interceptd.system.kernel import Kernel


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


def _facts(config: Config) -> tuple[HostFacts, Finding]:
    try:
        facts = host.detect(config)
    except HostError as exc:
        return HostFacts(ipv6=False, host_ip=None), Finding(
            "address", False, str(exc), "wait for the CNI plugin to give the pod an address, or check the "
            "namespace's interfaces (ip addr)")
    return facts, Finding("address", True, f"pod address {facts.host_ip}; IPv6 "
                          f"{'captured' if facts.ipv6 else 'not captured'}")


def features(config: Config, facts: HostFacts, kernel: Kernel) -> Finding:
    try:
        preflight.run(config, facts.ipv6, kernel)
    except PreflightError as exc:
        return Finding("kernel-features", False, str(exc), "load the modules named, or upgrade nftables")
    return Finding("kernel-features", True, f"libnftables {kernel.version()} and every kernel feature this "
                   "configuration needs are there")


def _loopback() -> Finding:
    if inspect.is_up("lo"):
        return Finding("loopback", True, "lo is up")
    return Finding("loopback", False, "lo is down: redirected connections go to 127.0.0.1 and fail",
                   "ip link set lo up (the CNI plugin's loopback plugin normally does it)")


def _table(config: Config, facts: HostFacts, kernel: Kernel, proposed: bool,
           ) -> tuple[list[Finding], Ruleset | None]:
    """The table's findings, and the installed ruleset (None when missing or unreadable)."""
    listing = kernel.list_table(config.table)
    flags = kernel.table_flags(config.table) if listing is not None else ()
    owner = doctor.owner(config.table, flags, config.own_table, listing is not None)
    if listing is None:
        return [doctor.table(config.table, [], False), owner], None
    try:
        installed = parse_listing(config.table, listing)
    except UnexplainableError as exc:
        return [Finding("table", False, f"table inet {config.table} holds rules interceptd does not write: {exc}",
                        "re-apply with `interceptd apply`; find who edits the table"), owner], None
    found = [d.detail for d in differences(render(config, facts), installed)] if proposed else None
    return [doctor.table(config.table, found, True), owner], installed


def run(config: Config, kernel: Kernel, proposed: bool = True) -> Report:
    """Every check, in the order a person would look; each one's failure is a finding, not an exception.

    `proposed`: the configuration was given on purpose (flags, --config, the agent's own): the table is
    compared with it. Otherwise the installed table is the reference for the listeners and hooks.
    """
    facts, address = _facts(config)
    findings = [features(config, facts, kernel), _loopback(), address]
    table, installed = _table(config, facts, kernel, proposed)
    findings += table
    reference = installed if installed is not None and not proposed else render(config, facts)
    findings.append(doctor.neighbours(reference, doctor.captures_ipv6(reference),
                                      inspect.other_tables(("inet", config.table)), inspect.interfaces()))
    findings.append(doctor.iptables(inspect.iptables_rules()))
    wanted, uids = doctor.listener_ports(reference)
    findings.append(doctor.listeners(wanted, inspect.listening_tcp(), uids))
    return Report(tuple(findings))
