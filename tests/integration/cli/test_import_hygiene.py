"""One-shot commands import only what they use: an init container and a CNI ADD pay for every module.

Each command runs as users run it (the console script, in a fresh interpreter, inside a lab namespace where
it needs the kernel) with PYTHONPROFILEIMPORTTIME=1, which makes Python list every module it imports on
stderr. The agents' machinery must not be among them, nor pyroute2 (routes and addresses change over rtnl).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.netlab import VENV_BIN, Lab, delete_ns, new_ns, sh
from support.nodelab import CniNode

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")

AGENT_ONLY = ("prometheus_client", "structlog", "asyncio", "http.server", "pyroute2", "interceptd.runtime.agent",
              "interceptd.runtime.metrics", "interceptd.runtime.logs")
# For the type checker only on the one-shot path (docs/architecture.md): typing (with _typing and warnings),
# contextlib and signal cost the seed's apply about 4 ms CPU, a fifth of Python's own start-up.
TYPING_ONLY = {"typing", "_typing", "warnings", "contextlib", "signal"}
PROFILE = {"PYTHONPROFILEIMPORTTIME": "1"}
SEED = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020")
# The seed as the benchmark gives it: a dotted IPv4 -x list.
SEED_CIDRS = (*SEED[:11], "198.18.0.0/30", *SEED[12:])
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)
_NESTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$", re.M)


def imported(stderr: str) -> set[str]:
    """The modules a run imported, from Python's -X importtime lines (top-level packages included)."""
    names = set(_IMPORTED.findall(stderr))
    assert "interceptd" in names, stderr[-2000:]  # the profile was really taken
    return names | {n.split(".")[0] for n in names}


def forbidden(names: set[str]) -> set[str]:
    return {n for n in AGENT_ONLY if n in names}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def _cli(lab: Lab, *args: str, script: str = "interceptd") -> set[str]:
    result = sh(str(VENV_BIN / script), *args, ns=lab.pod, check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PROFILE})
    assert result.returncode in (0, 3), result.stderr[-2000:]
    return imported(result.stderr)


@pytest.mark.parametrize("args", [
    ("apply", *SEED),
    ("render", *SEED),
    ("apply", "--dry-run", *SEED),
    ("status",),
    ("status", "--json"),
    ("explain", *SEED, "--uid", "1000", "--gid", "1000", "--dst", "198.51.100.7:80"),
    ("validate", *SEED),
    ("cleanup",),
    ("--version",),
    ("apply", "--help"),
], ids=lambda args: " ".join(args[:2]))
def test_one_shot_commands_import_no_agent_machinery(lab: Lab, args: tuple[str, ...]) -> None:
    if args[0] in ("status", "validate", "explain"):
        _cli(lab, "apply", *SEED)
    assert forbidden(_cli(lab, *args)) == set()


def test_the_istio_iptables_alias_imports_no_agent_machinery(lab: Lab) -> None:
    assert forbidden(_cli(lab, *SEED, script="istio-iptables")) == set()


@pytest.mark.parametrize("script,args", [("istio-iptables", SEED), ("interceptd", ("apply", *SEED))])
def test_applying_flags_defines_no_dataclass_and_reads_no_toml(lab: Lab, script: str, args: tuple[str, ...]) -> None:
    # Start-up cost: dataclasses compiles every class's methods at import (interceptd.records does not),
    # tomllib compiles its regular expressions, and argparse (with gettext and textwrap) is for help, errors
    # and unusual spellings (cli.main reads plain flags itself); the init container's command line needs none.
    # Nor does it compare tables (drift, the read-back's parser: the agent's and the CNI ADD's) or start threads.
    # socket.py (with selectors) neither: netlink takes a raw socket from _socket (system.rtnl).
    unused = {"dataclasses", "tomllib", "inspect", "argparse", "threading", "socket", "selectors",
              "interceptd.ruleset.drift", "interceptd.ruleset.nftparse", "interceptd.ruleset.tablediff"}
    assert unused & _cli(lab, *args, script=script) == set()


@pytest.mark.parametrize("script,args", [("istio-iptables", SEED_CIDRS), ("interceptd", ("apply", *SEED_CIDRS)),
                                         ("interceptd", ("apply", "-m", "TPROXY", "-i", "*", "-b", "*"))],
                         ids=["alias", "apply", "tproxy"])
def test_applying_imports_no_ipaddress(lab: Lab, script: str, args: tuple[str, ...]) -> None:
    # ipaddress (1 ms) reads only spellings other than its own (IPv6 CIDRs, netmasks) and resolv.conf: the
    # namespace's addresses are rtnetlink's bytes, dotted CIDRs and the defaults are read without it.
    assert "ipaddress" not in _cli(lab, *args, script=script)


@pytest.mark.parametrize("script,args", [("istio-iptables", SEED), ("interceptd", ("apply", *SEED))])
def test_applying_flags_imports_typing_for_the_type_checker_only(lab: Lab, script: str, args: tuple[str, ...]) -> None:
    assert TYPING_ONLY & _cli(lab, *args, script=script) == set()


@pytest.mark.parametrize("text,simple", [
    ('envoy_port = 15001\ninbound_capture_port = 15006\nproxy_uid = "1337"\nservice_cidr = "*"\n'
     'inbound_ports = "*"\nlocal_exclude_ports = [15090, 15021, 15020]\n# the seed\n', True),
    ('envoy_port = 15001  # a comment after a value is tomllib\'s to read\nservice_cidr = "*"\n', False),
], ids=["simple", "tomllib"])
def test_a_config_file_imports_typing_only_through_tomllib(lab: Lab, tmp_path: Path, text: str, simple: bool,
                                                           ) -> None:
    # A file of the usual shape is read without tomllib (config.options.simple_toml). tomllib's parser imports
    # typing (a NamedTuple) and with it contextlib and warnings: that is the standard library's cost of
    # reading TOML, not ours. Nothing of interceptd's imports them before tomllib does.
    config = tmp_path / "seed.toml"
    config.write_text(text)
    result = sh(str(VENV_BIN / "interceptd"), "apply", "--config", str(config), ns=lab.pod, check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PROFILE})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "signal" not in imported(result.stderr)
    assert "ipaddress" not in imported(result.stderr)
    assert ("tomllib" not in imported(result.stderr)) == simple
    assert {top for name, top in first_importers(result.stderr).items() if name in TYPING_ONLY} <= \
        (set() if simple else {"tomllib"})


def first_importers(stderr: str) -> dict[str, str]:
    """Each module and the top-level import it came in with: -X importtime prints a module's imports before it,
    one level deeper, so a module's importer is the next line printed less deep."""
    lines = [(len(indent), name) for indent, name in _NESTED.findall(stderr)]
    out = {}
    for i, (depth, name) in enumerate(lines):
        top, level = name, depth
        for later_depth, later in lines[i + 1:]:
            if later_depth < level:
                top, level = later, later_depth
        out[name] = top
    return out


def test_tproxy_and_ipv6_route_changes_import_no_agent_machinery(lab6: Lab) -> None:
    # TPROXY adds policy rules and routes, IPv6 the ::6 address on lo; cleanup removes the rules again.
    assert forbidden(_cli(lab6, "apply", "-m", "TPROXY", "-i", "*", "-b", "*", "--dual-stack")) == set()
    assert "::6/128" in sh("ip", "-6", "addr", "show", "dev", "lo", ns=lab6.pod).stdout
    assert "lookup 133" in sh("ip", "-6", "rule", ns=lab6.pod).stdout
    assert forbidden(_cli(lab6, "cleanup")) == set()
    assert "lookup 133" not in sh("ip", "-6", "rule", ns=lab6.pod).stdout


def test_the_agent_imports_its_machinery(lab: Lab) -> None:
    # `run` refuses --dry-run after loading the agent (exit 2): the same harness sees structlog and company.
    result = sh(str(VENV_BIN / "interceptd"), "run", "--dry-run", ns=lab.pod, check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **PROFILE})
    assert result.returncode == 2
    assert {"structlog", "prometheus_client", "interceptd.runtime.agent"} <= imported(result.stderr)


def test_cni_add_check_del_import_no_agent_machinery() -> None:
    pod = new_ns("-pod")
    try:
        with CniNode() as node:
            plugins = node.plugins()
            prev = None
            for command in ("ADD", "CHECK", "DEL"):
                bridge = node.exec(plugins[0], command, f"/run/netns/{pod}", "c-imports", prev=prev)
                assert bridge.rc == 0, bridge.stderr
                if command == "ADD":
                    prev = bridge.out
                own = node.exec(plugins[1], command, f"/run/netns/{pod}", "c-imports", prev=prev, env=PROFILE)
                assert own.rc == 0, own.stderr[-2000:]
                names = imported(own.stderr)
                assert forbidden(names) == set(), command
                # A CNI ADD is a whole process per pod: no class of its path is a dataclass (see interceptd.records).
                assert {"dataclasses", "inspect", "socket", "threading"} & names == set(), command
                assert TYPING_ONLY & names == set(), command
                assert command != "ADD" or "ipaddress" not in names  # the pod's addresses are read without it
                # The ruleset's digest comes from the C module under hashlib, which would load OpenSSL.
                assert command != "ADD" or {"hashlib", "_hashlib"} & names == set(), command
    finally:
        delete_ns(pod)
