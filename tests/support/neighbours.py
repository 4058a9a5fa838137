"""Neighbour tables a real node holds next to interceptd: kube-proxy-like `ip` and `ip6` tables (sets, a verdict
map, nat chains) and a firewalld-like `inet` table. Their rules match only 198.51.100.0/24, 2001:db8:9::/48,
port 9 and an interface the labs do not have, so no test traffic ever hits them.
"""

from __future__ import annotations

from pathlib import Path

from support.netlab import Lab, sh

KUBE_PROXY = """
table {fam} kube-proxy {{
    comment "rules for kube-proxy"
    set cluster-ips {{
        type {addr}
        comment "Active ClusterIPs"
        elements = {{ {ip1}, {ip2} }}
    }}
    set nodeport-ips {{
        type {addr}
        flags interval
        elements = {{ {net} }}
    }}
    map service-ips {{
        type {addr} . inet_proto . inet_service : verdict
        comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
        elements = {{ {ip1} . tcp . 80 : goto service-abc-tcp, {ip2} . udp . 53 : goto service-dns-udp }}
    }}
    chain service-abc-tcp {{
        {fam} daddr set {ip1} counter packets 0 bytes 0
    }}
    chain service-dns-udp {{
        counter packets 0 bytes 0 accept
    }}
    chain services {{
        {fam} daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        {fam} daddr @cluster-ips jump services
    }}
    chain filter-forward {{
        type filter hook forward priority -110; policy accept;
        ct state new {fam} daddr @nodeport-ips counter packets 0 bytes 0 drop
    }}
}}
"""

FIREWALLD = """
table inet firewalld {
    set allowed-v4 {
        type ipv4_addr
        flags interval
        elements = { 198.51.100.64/26 }
    }
    chain filter_INPUT {
        type filter hook input priority filter + 10; policy accept;
        ct state { established, related } accept
        iifname "lo" accept
        jump filter_INPUT_ZONES
    }
    chain filter_INPUT_ZONES {
        iifname "eth9" goto filter_IN_public
    }
    chain filter_IN_public {
        ip saddr @allowed-v4 tcp dport 9 counter packets 0 bytes 0 accept comment "public: discard"
        meta l4proto icmp accept
    }
    chain mangle_PREROUTING {
        type filter hook prerouting priority mangle + 10; policy accept;
        iifname "eth9" meta mark set 0x00000009
    }
}
"""


def install_neighbour_tables(lab: Lab | str, tmp_path: Path) -> None:
    """In the lab's pod, or in the namespace named (a node namespace)."""
    text = (KUBE_PROXY.format(fam="ip", addr="ipv4_addr", ip1="198.51.100.10", ip2="198.51.100.11",
                              net="198.51.100.128/25")
            + KUBE_PROXY.format(fam="ip6", addr="ipv6_addr", ip1="2001:db8:9::10", ip2="2001:db8:9::11",
                                net="2001:db8:9:1::/64")
            + FIREWALLD)
    path = tmp_path / "neighbours.nft"
    path.write_text(text)
    sh("nft", "-f", str(path), ns=lab if isinstance(lab, str) else lab.pod)
