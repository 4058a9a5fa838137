"""--drop-invalid, --run-validation / validate (docs/istio-compatibility.md, "Validation"), --skip-rule-apply,
--dry-run."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from support.netlab import VENV_BIN, Lab, call_in, sh

from interceptd.system.trace import internet_checksum


def synack_gets_reset(src: str, dst: str, dport: int) -> bool:
    """Send an unsolicited SYN+ACK (conntrack: invalid); True if the target answers with a RST."""
    sport = 40123
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        header = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x12, 65535, 0, 0)
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, 20)
        header = header[:16] + struct.pack("!H", internet_checksum(pseudo + header)) + header[18:]
        s.settimeout(0.2)
        s.sendto(header, (dst, 0))
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                packet = s.recv(256)
            except TimeoutError:
                continue
            ihl = (packet[0] & 0xF) * 4
            psrc, pdst, _seq, _ack, _off, flags = struct.unpack("!HHIIBB", packet[ihl:ihl + 14])
            if psrc == dport and pdst == sport and flags & 0x04:
                return True
    return False


@pytest.mark.parametrize(("flags", "reset"), [([], True), (["--drop-invalid"], False)])
def test_drop_invalid(lab: Lab, flags: list[str], reset: bool) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*", *flags)
    assert call_in(lab.peer, synack_gets_reset, lab.peer_ip, lab.pod_ip, 8080) is reset
    lab.serve(lab.pod, "pod", tcp=[15006])
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"


def test_drop_invalid_from_env(lab: Lab) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*", env={"INVALID_DROP": "true"})
    assert call_in(lab.peer, synack_gets_reset, lab.peer_ip, lab.pod_ip, 8080) is False


def test_validation_passes_with_rules(lab: Lab) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*", "--run-validation")
    result = lab.interceptd("validate")
    assert "validation passed" in result.stderr
    # CNI style: the rules were programmed by someone else, the validation container only tests them.
    cni = sh(str(VENV_BIN / "istio-iptables"), "--run-validation", "--skip-rule-apply", ns=lab.pod, check=False)
    assert cni.returncode == 0, cni.stderr


def test_validation_passes_in_tproxy_and_dual_stack(lab6: Lab) -> None:
    lab6.interceptd("apply", "-m", "TPROXY", "-i", "*", "-b", "*", "--run-validation")
    lab6.interceptd("apply", "--dual-stack", "-i", "*", "-b", "*", "--run-validation")


def test_validation_fails_with_126_and_says_what(lab: Lab) -> None:
    result = lab.interceptd("apply", "--skip-rule-apply", "--run-validation", "--probe-timeout", "1500ms",
                            check=False)
    assert result.returncode == 126
    assert sh("nft", "list", "tables", ns=lab.pod).stdout == ""  # --skip-rule-apply programmed nothing
    message = result.stderr.strip()
    assert "outbound capture from the proxy back into the pod does not work" in message
    assert "127.0.0.6:15002" in message and "not redirected" in message and ":15006" in message
    # Rules that do not redirect the probe's port: the probe lands nowhere either.
    lab.interceptd("apply", "-i", "*", "-b", "*", "-o", "15002")
    result = lab.interceptd("validate", "--probe-timeout", "1s", check=False)
    assert result.returncode == 126 and "not redirected" in result.stderr


def test_validation_fails_without_listener(lab: Lab) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*")
    lab.serve(lab.pod, "squatter", tcp=[15001, 15006])  # no SO_REUSEPORT: validation cannot bind
    result = lab.interceptd("validate", "--probe-timeout", "1s", check=False)
    assert result.returncode == 126
    assert result.stderr.splitlines() == [
        "interceptd: error: validation failed: cannot listen on 127.0.0.1 port 15001 (taken), 15006 (taken): "
        "--run-validation needs the proxy ports free, so it must run before the proxy starts (in the init "
        "container, not next to a running proxy)"], result.stderr


def test_dry_run_never_touches_the_kernel(lab6: Lab) -> None:
    before = (lab6.nft_json(), sh("ip", "rule", ns=lab6.pod).stdout, sh("ip", "-6", "addr", ns=lab6.pod).stdout)
    result = lab6.interceptd("apply", "-n", "--dual-stack", "-m", "TPROXY", "-i", "*", "-b", "*")
    assert '"tproxy"' in result.stdout
    after = (lab6.nft_json(), sh("ip", "rule", ns=lab6.pod).stdout, sh("ip", "-6", "addr", ns=lab6.pod).stdout)
    assert after == before
    lab6.interceptd("apply", "--skip-rule-apply", "--dual-stack", "-m", "TPROXY", "-b", "*")
    assert (lab6.nft_json(), sh("ip", "rule", ns=lab6.pod).stdout) == before[:2]
    # "inet6 ::6/": a link-local address such as fe80::68eb:... holds "::6" too.
    assert "inet6 ::6/" not in sh("ip", "-6", "addr", ns=lab6.pod).stdout
