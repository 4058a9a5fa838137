"""Ambient capture mode with real traffic (docs/ambient.md): for each of Istio's in-pod variants, IPv4 and IPv6.

The pod runs a stand-in for the node proxy: listeners on the outbound (15001), inbound (15006), tunnel (15008)
and DNS (15053) ports whose sockets carry SO_MARK 0x539, as ztunnel's do. The peer runs the "real" servers
(TCP 80, DNS on 53) and is where inbound connections and the node's health probes (from 169.254.7.127, or
the IPv6 probe address) come from. Each variant's settings come from the CNI plugin's per-pod logic
(label istio.io/dataplane-mode=ambient plus Istio's ambient annotations), then go to `interceptd apply`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.netlab import Lab, call_in, sh, udp_query

from interceptd.cli import cni
from interceptd.config import Config
from interceptd.runtime.nodestate import settings_config

MARK = 0x539
APP = {"uid": 1000, "gid": 1000}
PROBE = {4: "169.254.7.127", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"}
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
VM_LINK = {4: ("192.0.2.129/25", "192.0.2.130/25"), 6: ("2001:db8:2::1/64", "2001:db8:2::2/64")}


def marked_tcp(host: str, port: int, mark: int, source: str | None = None, transparent: bool = False) -> str:
    """What the node proxy does: a connection with SO_MARK, optionally from a foreign address (IP_TRANSPARENT,
    the way ztunnel connects to the app as the original client)."""
    v6 = ":" in host
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if transparent:
            s.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.SOL_IP, IPV6_TRANSPARENT if v6 else IP_TRANSPARENT, 1)
        if source:
            s.bind((source, 0))
        try:
            s.connect((host, port))
            return s.recv(256).decode().strip()
        except ConnectionRefusedError:
            return "refused"
        except (TimeoutError, ConnectionResetError):
            return "timeout"


def routes_missing(flags: list[str]) -> list[str]:
    """Inside the pod: what the rendered policy routes need and the kernel lacks (drift's view of them)."""
    from interceptd.cli import main as cli
    from interceptd.ruleset.facts import HostFacts
    from interceptd.ruleset.render import render
    from interceptd.system import routes

    _args, config = cli.parse(["render", *flags], env={})
    facts = HostFacts(ipv6=False, host_ip="192.0.2.2")
    return routes.missing(render(config, facts), routes.Netlink(addresses=()))


@dataclass(frozen=True)
class Variant:
    """One of Istio's in-pod goldens, as the pod's CNI settings: the node's DNS setting and the pod's labels
    and annotations."""

    global_dns: bool
    pod_dns: str | None = None  # ambient.istio.io/dns-capture
    ingress: bool = False  # ambient.istio.io/bypass-inbound-capture
    virt: bool = False  # istio.io/reroute-virtual-interfaces

    def config(self) -> Config:
        args = {cni.DATAPLANE_MODE_LABEL: cni.AMBIENT}
        if self.pod_dns is not None:
            args["ambient.istio.io/dns-capture"] = self.pod_dns
        if self.ingress:
            args["ambient.istio.io/bypass-inbound-capture"] = "true"
        if self.virt:
            args["istio.io/reroute-virtual-interfaces"] = "vm0"
        settings = cni.pod_settings({"interceptd": {"redirect_dns": self.global_dns}}, args)
        assert settings is not None
        return settings_config(settings, "test")


VARIANTS = {
    "default": Variant(global_dns=True),
    "dns_pod_disabled_and_on_globally": Variant(global_dns=True, pod_dns="false"),
    "dns_pod_enabled_and_off_globally": Variant(global_dns=False, pod_dns="true"),
    "hostprobe": Variant(global_dns=False),
    "ingress": Variant(global_dns=False, ingress=True),
    "virtual_interfaces": Variant(global_dns=False, virt=True),
    "ingress_and_virtual_interfaces": Variant(global_dns=False, ingress=True, virt=True),
}


def apply_flags(config: Config, family: int) -> list[str]:
    """The command line for the CNI plugin's decision (`interceptd apply --capture-mode ambient ...`)."""
    flags = ["apply", "--capture-mode", config.capture_mode]
    flags += ["--redirect-dns"] if config.redirect_dns else []
    flags += ["--ambient-ingress"] if config.ambient_ingress else []
    flags += ["-k", ",".join(config.kube_virt_interfaces)] if config.kube_virt_interfaces else []
    return flags + (["--dual-stack"] if family == 6 else [])


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def ambient_lab(family: int) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab(v6=family == 6) as lab:
        lab.serve(lab.peer, "real", tcp=[80, 53], udp=[53])
        lab.serve(lab.pod, "proxy", tcp=[15001, 15006, 15008], mark=MARK)
        lab.serve(lab.pod, "dnsproxy", tcp=[15053], udp=[15053], mark=MARK)
        lab.serve(lab.pod, "app", tcp=[8080])
        # The node's probes: the probe address lives in the peer, which the pod reaches it through.
        probe, peer = PROBE[family], lab.peer_ip if family == 4 else lab.peer_ip6
        sh("ip", "addr", "add", probe, "dev", "lo", *(["nodad"] if family == 6 else []), ns=lab.peer)
        sh("ip", "route", "add", probe, "via", peer, ns=lab.pod)
        yield lab


def addresses(lab: Lab, family: int) -> tuple[str, str, str]:
    """pod, peer, and a remote destination beyond the peer."""
    if family == 4:
        return lab.pod_ip, lab.peer_ip, "203.0.113.1"
    return lab.pod_ip6, lab.peer_ip6, lab.peer_ip6


def attach_vm(lab: Lab, family: int) -> str:
    """A VM behind the pod's virtual interface vm0, whose traffic arrives in the pod on vm0."""
    pod_side, vm_side = VM_LINK[4]
    vm = lab.attach("vm0", pod_side, vm_side)
    if family == 6:
        pod_side, vm_side = VM_LINK[6]
        sh("ip", "addr", "add", pod_side, "dev", "vm0", "nodad", ns=lab.pod)
        sh("ip", "addr", "add", vm_side, "dev", "eth0", "nodad", ns=vm)
        sh("ip", "-6", "route", "add", "default", "via", pod_side.split("/")[0], ns=vm)
    return vm


def words(answer: str, n: int = 3) -> list[str]:
    return answer.split()[:n]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ambient_variant_with_real_traffic(ambient_lab: Lab, family: int, name: str) -> None:
    lab, variant = ambient_lab, VARIANTS[name]
    config = variant.config()
    assert config.ambient
    pod, peer, remote = addresses(lab, family)
    vm = attach_vm(lab, family) if variant.virt else None
    lab.interceptd(*apply_flags(config, family))

    # The app's outbound TCP reaches the node proxy's outbound port, original destination kept.
    assert words(lab.request(lab.pod, remote, 80, **APP)) == ["proxy", "15001", f"{remote}:80"]
    # The node proxy's own (marked) connections are not captured.
    assert words(str(call_in(lab.pod, marked_tcp, remote, 80, MARK))) == ["real", "80", "-"]

    # Inbound TCP goes to the inbound port, except for the tunnel port (and everything in ingress mode).
    inbound = lab.request(lab.peer, pod, 8080)
    if config.ambient_ingress:
        assert words(inbound) == ["app", "8080", "-"]
    else:
        assert words(inbound) == ["proxy", "15006", f"{pod}:8080"]
    assert words(lab.request(lab.peer, pod, 15008)) == ["proxy", "15008", "-"]

    # The node's health probe reaches the app directly.
    probe = PROBE[family]
    assert lab.request(lab.peer, pod, 8080, source=probe).split() == ["app", "8080", "-", probe]

    # The node proxy connecting to the app as the original client (foreign source, marked): the app's replies
    # are routed back to the proxy by the connection mark, not sent to the client.
    spoofed = call_in(lab.pod, marked_tcp, pod, 8080, MARK, peer, True)
    assert str(spoofed).split() == ["app", "8080", "-", peer]

    # DNS goes to the DNS proxy only where the pod's DNS capture is on; the proxy's own queries never.
    dns = "dnsproxy" if config.redirect_dns else "real"
    assert call_in(lab.pod, udp_query, remote, 53, **APP) == dns
    assert call_in(lab.pod, udp_query, remote, 53, MARK) == "real"
    assert call_in(lab.pod, udp_query, remote, 53, **APP) == dns  # zones: the proxy's query stole nothing
    # TCP DNS: to the DNS proxy, or (capture off) outbound TCP like any other.
    tcp_dns = ["dnsproxy", "15053"] if config.redirect_dns else ["proxy", "15001"]
    assert words(lab.request(lab.pod, remote, 53, **APP)) == [*tcp_dns, f"{remote}:53"]

    if vm is not None:
        # TCP arriving on the virtual interface is outbound: to the outbound port, destination kept.
        assert words(lab.request(vm, remote, 80)) == ["proxy", "15001", f"{remote}:80"]


def test_replies_need_the_connmark_route_and_explain_agrees_with_the_kernel(lab: Lab) -> None:
    """A control for the connmark check above (without the policy route the app's reply goes to the real
    client, and the proxy's connection fails), and `explain --from-kernel` on the installed ambient table."""
    lab.serve(lab.pod, "proxy", tcp=[15001, 15006], mark=MARK)
    lab.serve(lab.pod, "app", tcp=[8080])
    lab.interceptd("apply", "--capture-mode", "ambient")
    assert str(call_in(lab.pod, marked_tcp, lab.pod_ip, 8080, MARK, lab.peer_ip, True)).split()[0] == "app"
    assert "fwmark 0x111/0xfff lookup 100" in sh("ip", "rule", ns=lab.pod).stdout  # as istio-cni's rule
    assert call_in(lab.pod, routes_missing, ["--capture-mode", "ambient"]) == []  # read back as rendered
    sh("ip", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100", ns=lab.pod)
    assert call_in(lab.pod, marked_tcp, lab.pod_ip, 8080, MARK, lab.peer_ip, True) in ("timeout", "refused")
    assert call_in(lab.pod, routes_missing, ["--capture-mode", "ambient"]) == \
        ["ip rule fwmark 273/0xfff lookup 100"]

    explain = ["explain", "--capture-mode", "ambient", "--from-kernel", "--outbound", "--dst", "203.0.113.1:80",
               "--uid", "1000", "--gid", "1000"]
    out = lab.interceptd(*explain).stdout
    assert "decided by: istio-redirect/redirect-outbound" in out and ":15001" in out
    marked = lab.interceptd(*explain, "--mark", "0x539").stdout
    assert "not intercepted" in marked and "MATCH proxy-mark-return" in marked
    assert words(lab.request(lab.pod, "203.0.113.1", 80, **APP)) == ["proxy", "15001", "203.0.113.1:80"]
    bad = lab.interceptd(*explain, "--mark", "0xzz", check=False)
    assert bad.returncode == 2 and "--mark" in bad.stderr
