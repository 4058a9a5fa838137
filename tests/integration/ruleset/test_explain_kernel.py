"""`explain` against the kernel. Random configurations and connections: the model's verdict must be
what a real connection in a lab namespace experiences, and the rules the model says match must be those a
kernel trace reports (`explain --kernel`); the seed's decision table (docs/istio-compatibility.md) through the CLI's
`explain --kernel`.

Budget: FUZZ_PROFILE=ci (make test) draws EXPLAIN_CONFIGS configurations (default 25) per address family,
each with CONNS_PER_CONFIG connections; `make fuzz` (FUZZ_PROFILE=fuzz FUZZ_EXAMPLES=N) multiplies it.
One lab per family is shared by all draws: each draw re-applies its ruleset atomically.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import Phase, given
from hypothesis import strategies as st
from support.fuzz_strategies import settings  # registers the ci/fuzz profiles
from support.netlab import Lab, call_in, sh, tcp_request, udp_request

from interceptd.config import Config, load
from interceptd.control import install
from interceptd.ruleset.explain import Connection, Explanation, explain
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.render import render
from interceptd.system.kernel import NftKernel
from interceptd.system.routes import Netlink
from interceptd.system.trace import probe

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1
CONFIGS = int(os.environ.get("EXPLAIN_CONFIGS", "25")) * SCALE
CONNS_PER_CONFIG = 10
IP = ipaddress.ip_address
POOL = (53, 80, 3306, 8080, 9090, 15001, 15008, 15020, 15090)  # served in the pod and on the peer
UDP_POOL = (53, 9090)
TRANSPARENT = 15006  # the pod's inbound listener is transparent (TPROXY) and answers its local address
PROXY_IDS = (1337, 1338)
IDS = (0, 1000, 1337, 1338)
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # each example costs real connections: report as drawn


def _serve(lab: Lab) -> Lab:
    lab.serve(lab.pod, "pod", tcp=[*POOL, 15053], udp=[*UDP_POOL, 15053])
    lab.serve(lab.pod, "pod", tcp=[TRANSPARENT], transparent=True)
    lab.serve(lab.peer, "peer", tcp=POOL, udp=UDP_POOL)
    return lab


@pytest.fixture(scope="module")
def labs() -> Iterator[dict[int, Lab]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab() as lab4, Lab(v6=True) as lab6:
        yield {4: _serve(lab4), 6: _serve(lab6)}


def _ports(draw: st.DrawFn, allow_range: bool = True) -> str:
    items = draw(st.lists(st.sampled_from(POOL), max_size=3, unique=True))
    text = [str(p) for p in items]
    if allow_range and draw(st.booleans()):
        text.append("8000-8100")
    return ",".join(text)


@st.composite
def configs(draw: st.DrawFn, v6: bool) -> dict[str, str]:
    cidrs = ["198.51.100.0/24", "203.0.113.0/25", "192.0.2.0/24", "127.0.0.0/8"]
    cidrs += ["2001:db8::/64", "2001:db8::1/128"] if v6 else []
    flags = {
        "proxy_uid": ",".join(map(str, draw(st.lists(st.sampled_from(PROXY_IDS), min_size=1, unique=True)))),
        "inbound_interception_mode": draw(st.sampled_from(["REDIRECT", "TPROXY"])),
        "inbound_ports": draw(st.sampled_from(["*", "", "80,8080,15008", "9090,8000-8100"])),
        "local_exclude_ports": _ports(draw),
        "service_cidr": draw(st.one_of(st.just("*"), st.just(""),
                                       st.lists(st.sampled_from(cidrs), min_size=1, unique=True).map(",".join))),
        "service_exclude_cidr": ",".join(draw(st.lists(st.sampled_from(
            ["198.51.100.0/25", "203.0.113.1/32", *(["2001:db8::1/128"] if v6 else [])]), unique=True))),
        "outbound_ports": _ports(draw, allow_range=False),
        "local_outbound_ports_exclude": _ports(draw),
        "redirect_dns": draw(st.sampled_from(["true", "false"])),
        "capture_all_dns": draw(st.sampled_from(["true", "false"])),
        "drop_invalid": draw(st.sampled_from(["true", "false"])),
    }
    if draw(st.integers(0, 9)) == 0:
        flags["exclude_interfaces"] = "eth0"
    if draw(st.integers(0, 3)) == 0:  # ambient (docs/ambient.md): the sidecar-only flags above change nothing
        flags.update(capture_mode="ambient", inbound_interception_mode="REDIRECT",
                     ambient_ingress=draw(st.sampled_from(["true", "false"])))
    if draw(st.booleans()):
        flags["proxy_gid"] = ",".join(map(str, draw(st.lists(st.sampled_from(PROXY_IDS), min_size=1, unique=True))))
    return flags


@st.composite
def connections(draw: st.DrawFn, lab: Lab) -> Connection:
    v6 = lab.v6 and draw(st.booleans())
    pod = IP(lab.pod_ip6 if v6 else lab.pod_ip)
    peer = IP(lab.peer_ip6 if v6 else lab.peer_ip)
    protocol = draw(st.sampled_from(["tcp", "tcp", "udp"]))
    dport = draw(st.sampled_from(POOL if protocol == "tcp" else UDP_POOL))
    if draw(st.integers(0, 3)) == 0:
        return Connection("inbound", protocol, pod, dport, peer, 0, iif="eth0")
    remote = [peer] + ([] if v6 else [IP("198.51.100.1"), IP("203.0.113.1")])
    local = [pod, IP("::1")] if v6 else [pod, IP("127.0.0.1"), IP("127.0.0.2")]
    dst = draw(st.sampled_from(remote + local))
    is_local = dst in local
    src = dst if dst == pod else IP("::1" if v6 else "127.0.0.1") if is_local else pod
    if is_local and not v6 and protocol == "tcp" and draw(st.integers(0, 4)) == 0:
        src = IP("127.0.0.6")  # the proxy's inbound passthrough source
    return Connection("outbound", protocol, dst, dport, src, 0, draw(st.sampled_from(IDS)),
                      draw(st.sampled_from(IDS)), oif="lo" if is_local else "eth0")


def _hostport(addr: Any, port: int) -> str:
    return f"{addr}:{port}"


def expected(conn: Connection, result: Explanation, lab: Lab) -> tuple[str, int, str]:
    """(who answers, on which port, what it reports as original destination: orig / - / other)."""
    v = result.verdict
    if v.action in ("redirect", "tproxy"):
        port = v.port
        who = "pod"
    else:
        port = conn.dport
        local = conn.direction == "inbound" or conn.dst.is_loopback or str(conn.dst) in (lab.pod_ip, lab.pod_ip6)
        who = "pod" if local else "peer"
    if conn.protocol == "udp":
        return who, port, ""
    if who == "pod" and port == TRANSPARENT:  # answers its local address: the original one unless NATed
        return who, port, "other" if v.action == "redirect" else "orig"
    return who, port, "orig" if v.action == "redirect" else "-"


def observed(conn: Connection, lab: Lab) -> tuple[str, int, str]:
    ns = lab.peer if conn.direction == "inbound" else lab.pod
    uid, gid = (conn.uid, conn.gid) if conn.direction == "outbound" else (None, None)
    source = str(conn.src) if str(conn.src) == "127.0.0.6" else None
    if conn.protocol == "udp":
        answer = str(call_in(ns, udp_request, str(conn.dst), conn.dport, 1.0, uid=uid, gid=gid))
        words = answer.split()
        return (words[0], int(words[1]), "") if len(words) == 3 else (answer, 0, "")
    answer = str(call_in(ns, tcp_request, str(conn.dst), conn.dport, 1.0, source, uid=uid, gid=gid))
    words = answer.split()
    if len(words) != 4:
        return answer, 0, ""
    odst = words[2]
    original = _hostport(conn.dst, conn.dport)
    return words[0], int(words[1]), "-" if odst == "-" else "orig" if odst == original else "other"


def _apply_and_list(config: Config, facts: HostFacts) -> list[dict[str, Any]]:
    kernel = NftKernel()
    install.apply(kernel, Netlink(), render(config, facts))
    listing = kernel.list_table(config.table)
    assert listing is not None
    return listing


def _facts(lab: Lab, flags: dict[str, str]) -> HostFacts:
    return HostFacts(ipv6=lab.v6, host_ip=lab.pod_ip, dns_v4=(IP(lab.peer_ip),),  # type: ignore[arg-type]
                     dns_v6=(IP(lab.peer_ip6),) if lab.v6 else ())  # type: ignore[arg-type]


def _check(lab: Lab, flags: dict[str, str], conns: list[Connection], traced: int) -> None:
    config = load(flags, {})
    facts = _facts(lab, flags)
    rendered = render(config, facts)
    installed: Ruleset = parse_listing(config.table, call_in(lab.pod, _apply_and_list, config, facts))
    for n, conn in enumerate(conns):
        result = explain(rendered, conn)
        from_kernel = explain(installed, conn)
        assert (from_kernel.matched(), from_kernel.verdict) == (result.matched(), result.verdict), conn.describe()
        assert observed(conn, lab) == expected(conn, result, lab), \
            f"{conn.describe()} with {flags}: model says {result.verdict.text}"
        if n == traced and conn.direction == "outbound":
            kernel = call_in(lab.pod, probe, config.table, conn, timeout=10.0)
            assert kernel.rules == tuple(result.matched()), f"{conn.describe()} with {flags}"


def _run(labs: dict[int, Lab], family: int, data: st.DataObject) -> None:
    lab = labs[family]
    flags = data.draw(configs(lab.v6), label="config")
    conns = data.draw(st.lists(connections(lab), min_size=CONNS_PER_CONFIG, max_size=CONNS_PER_CONFIG),
                      label="connections")
    _check(lab, flags, conns, data.draw(st.integers(0, CONNS_PER_CONFIG - 1), label="traced"))


@settings(max_examples=CONFIGS, phases=NO_SHRINK)
@given(data=st.data())
def test_model_agrees_with_real_connections_ipv4(labs: dict[int, Lab], data: st.DataObject) -> None:
    _run(labs, 4, data)


@settings(max_examples=CONFIGS, phases=NO_SHRINK)
@given(data=st.data())
def test_model_agrees_with_real_connections_ipv6(labs: dict[int, Lab], data: st.DataObject) -> None:
    _run(labs, 6, data)


SPEC = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]
# Spec 2.7's rows, 10.0.0.x there being 192.0.2.x here: (explain arguments, what the verdict says).
SPEC_ROWS = [
    *[(["--inbound", "--src", "192.0.2.1", "--dst", f"192.0.2.2:{p}"], "inbound listener :15006")
      for p in (80, 8080, 15001, 15006)],
    *[(["--inbound", "--src", "192.0.2.1", "--dst", f"192.0.2.2:{p}"], "not intercepted")
      for p in (15008, 15090, 15021, 15020)],
    (["--inbound", "--protocol", "udp", "--src", "192.0.2.1", "--dst", "192.0.2.2:53"], "not intercepted"),
    (["--uid", "1000", "--gid", "1000", "--dst", "192.0.2.1:9999"], "outbound listener :15001"),
    (["--uid", "1337", "--gid", "1000", "--dst", "192.0.2.1:9999"], "not intercepted"),
    (["--uid", "1000", "--gid", "1337", "--dst", "192.0.2.1:9999"], "not intercepted"),
    (["--uid", "1000", "--gid", "1000", "--dst", "192.0.2.2:8080"], "not intercepted"),
    (["--uid", "1337", "--gid", "1337", "--dst", "192.0.2.2:8080"], "inbound listener :15006"),
    (["--uid", "1000", "--gid", "1337", "--dst", "192.0.2.2:8080"], "not intercepted"),
    (["--uid", "1337", "--gid", "1337", "--dst", "192.0.2.2:15008"], "not intercepted"),
    (["--uid", "1337", "--gid", "1337", "--dst", "127.0.0.1:8080"], "not intercepted"),
    (["--uid", "1337", "--gid", "1337", "--dst", "127.0.0.2:8080"], "inbound listener :15006"),
    (["--uid", "1337", "--gid", "1337", "--src", "127.0.0.1", "--dst", "127.0.0.6:15002"],
     "inbound listener :15006"),
    (["--uid", "1000", "--gid", "1000", "--protocol", "udp", "--dst", "192.0.2.1:53"], "not intercepted"),
]


def _kernel_agrees(lab: Lab, flags: list[str], rows: list[tuple[list[str], str]]) -> None:
    """Apply `flags`, then `explain --kernel` each row: the trace must agree and the verdict say the text."""
    lab.interceptd("apply", *flags)
    for args, verdict in rows:
        result = lab.interceptd("explain", "--kernel", *flags, *args, check=False)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "kernel agrees with the model" in result.stdout, (args, result.stdout)
        assert verdict in result.stdout.split("verdict: ")[1].splitlines()[0], (args, result.stdout)


def test_explain_kernel_agrees_on_the_spec_table(lab: Lab) -> None:
    _kernel_agrees(lab, SPEC, SPEC_ROWS)
    # Nothing of the probes is left behind: only interceptd's table, no probe interface.
    tables = sh("nft", "list", "tables", ns=lab.pod).stdout.split()
    assert tables == ["table", "inet", "interceptd"]
    assert "icdprobe" not in sh("ip", "link", ns=lab.pod).stdout


def test_explain_kernel_says_so_when_the_kernel_decides_otherwise(lab: Lab) -> None:
    # Configured (model) and installed (kernel) rules differ: the kernel does not redirect, the model does.
    lab.interceptd("apply", "-u", "1337", "-i", "")
    result = lab.interceptd("explain", "--kernel", "-u", "1337", "-i", "*", "--uid", "1000", "--gid", "1000",
                            "--dst", "192.0.2.1:9999", check=False)
    assert result.returncode == 1
    assert "KERNEL AND MODEL DISAGREE" in result.stdout and "MODEL AND KERNEL DISAGREE" in result.stderr
    # --from-kernel explains what is installed, and then the kernel agrees.
    ok = lab.interceptd("explain", "--kernel", "--from-kernel", "--uid", "1000", "--gid", "1000",
                        "--dst", "192.0.2.1:9999")
    assert "not intercepted" in ok.stdout and "kernel agrees" in ok.stdout


AMBIENT = ["--capture-mode", "ambient", "--redirect-dns"]
# Istio's ambient in-pod decisions (docs/ambient.md): (explain arguments, what the verdict says).
AMBIENT_ROWS = [
    (["--uid", "1000", "--gid", "1000", "--dst", "203.0.113.1:80"], "outbound listener :15001"),
    (["--mark", "0x539", "--dst", "203.0.113.1:80"], "not intercepted"),
    (["--uid", "1000", "--gid", "1000", "--protocol", "udp", "--dst", "203.0.113.1:53"], ":15053"),
    (["--uid", "1000", "--gid", "1000", "--dst", "203.0.113.1:53"], ":15053"),
    (["--mark", "0x539", "--protocol", "udp", "--dst", "203.0.113.1:53"], "not intercepted"),
    (["--uid", "1000", "--gid", "1000", "--dst", "192.0.2.2:8080"], "not intercepted"),
    (["--inbound", "--src", "192.0.2.1", "--dst", "192.0.2.2:8080"], "inbound listener :15006"),
    (["--inbound", "--src", "192.0.2.1", "--dst", "192.0.2.2:15008"], "not intercepted"),
    (["--inbound", "--src", "169.254.7.127", "--iif", "eth0", "--dst", "192.0.2.2:8080"], "not intercepted"),
]


def test_explain_kernel_agrees_on_ambient_decisions(lab: Lab) -> None:
    _kernel_agrees(lab, AMBIENT, AMBIENT_ROWS)
