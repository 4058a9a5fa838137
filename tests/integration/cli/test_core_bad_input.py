"""Every bad input, tried as a new user would: one line naming the flag and value, exit 2, kernel untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.netlab import Lab, call_in, sh

from interceptd.ruleset import names as N

BAD = [
    (["-p", "70000"], {}, "70000"),
    (["-p", "http"], {}, "http"),
    (["-x", "10.0.0.0/33"], {}, "10.0.0.0/33"),
    (["-x", "*"], {}, "*"),
    (["-m", "tproxy"], {}, "tproxy"),
    (["-m", "SIDECAR"], {}, "SIDECAR"),
    (["-u", "nosuchuser"], {}, "nosuchuser"),
    (["-g", "12a"], {}, "12a"),
    (["-b", "80,*"], {}, "80,*"),
    (["-c", "an-interface-name-too-long"], {}, "an-interface-name-too-long"),
    (["--no-such-flag"], {}, "--no-such-flag"),
    (["-c", "@x"], {}, "@x"),  # libnftables would read a set reference
    (["-k", "eth*"], {}, "eth*"),  # and a wildcard
    (["-x", "fe80::1%x/128"], {}, "fe80::1%x/128"),
    (["--envoy-user", "a\tb"], {}, "--envoy-user"),
    (["--reconcile-interval", "1e-300"], {}, "--reconcile-interval"),
    ([], {"ISTIO_LOCAL_EXCLUDE_PORTS": "15090,abc"}, "15090,abc"),
    ([], {"INVALID_DROP": "yes please"}, "yes please"),
]


@pytest.mark.parametrize(("args", "env", "value"), BAD, ids=[" ".join(b[0]) or next(iter(b[1])) for b in BAD])
def test_bad_input_changes_nothing(lab: Lab, args: list[str], env: dict[str, str], value: str) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*", "-x", "192.0.2.0/24")
    before = lab.nft_json()
    result = lab.interceptd("apply", "-i", "*", "-b", "*", *args, check=False, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and value in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert lab.nft_json() == before


def test_bad_toml_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    lab.interceptd("apply", "-i", "*")
    before = lab.nft_json()
    for text, needle in (('envoy_port = "x"\n', "envoy_port"), ("nope = 1\n", "nope"), ("[[x\n", "TOML"),
                         ("envoy_port = 1" + "0" * 4400 + "\n", "TOML"),
                         ("service_cidr = " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply")):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        result = lab.interceptd("apply", "--config", str(path), check=False)
        assert result.returncode == 2 and needle in result.stderr and len(result.stderr.splitlines()) == 1
    assert lab.nft_json() == before


def test_kernel_refusal_names_the_failing_command_and_keeps_the_ruleset(lab: Lab) -> None:
    """A transaction the kernel refuses (a jump to a chain that does not exist) changes nothing."""
    lab.interceptd("apply", "-i", "*")
    before = lab.nft_json()

    def refuse() -> str:
        from interceptd.errors import KernelRefusedError
        from interceptd.system.kernel import NftKernel

        doc = {"nftables": [
            {"add": {"table": {"family": "inet", "name": "interceptd"}}},
            {"flush": {"table": {"family": "inet", "name": "interceptd"}}},
            {"add": {"rule": {"family": "inet", "table": "interceptd", "chain": N.ISTIO_OUTPUT, "comment": "bad",
                              "expr": [{"jump": {"target": "no-such-chain"}}]}}}]}
        try:
            NftKernel().apply(doc)
        except KernelRefusedError as exc:
            return str(exc)
        return "accepted"

    message = call_in(lab.pod, refuse)
    assert 'command 3 of 3 (add rule inet interceptd istio-output "bad")' in message, message
    assert lab.nft_json() == before


def test_render_is_accepted_by_nft_check_mode(lab: Lab, tmp_path: Path) -> None:
    configs = [
        ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
         "-d", "15090,15021,15020"],
        ["-i", "10.0.0.0/8,2001:db8::/32", "-x", "10.1.0.0/16,10.1.2.0/24", "-b", "80,8080-8090", "-q", "443",
         "-o", "53,8443", "-c", "eth1", "-k", "virt0"],
        ["-i", "*", "-b", "*", "-u", "1337,1338", "-g", "1337,0", "--redirect-dns", "--capture-all-dns"],
        ["-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*", "--drop-invalid", "--dual-stack"],
        ["-i", "127.0.0.0/8", "-b", ""],
    ]
    for n, args in enumerate(configs):
        for ipv6 in ("on", "off"):
            out = lab.interceptd("render", "--ipv6", ipv6, *args, env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "0"})
            path = tmp_path / f"r{n}{ipv6}.json"
            path.write_text(out.stdout)
            json.loads(out.stdout)
            check = sh("nft", "-j", "-c", "-f", str(path), ns=lab.pod, check=False)
            assert check.returncode == 0, (args, ipv6, check.stderr)
