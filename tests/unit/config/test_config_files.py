"""The shipped configuration files: the generated reference is current and loads as the defaults, every
example loads through config.load and renders what its comments promise, and the README's generated
reference matches the CLI."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from interceptd import __version__
from interceptd.cli import docs
from interceptd.config import options as config
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Redirect, Ruleset, TProxy
from interceptd.ruleset.render import render

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.toml"))
FACTS = HostFacts(ipv6=True, host_ip="192.0.2.2",
                  dns_v4=(ipaddress.IPv4Address("192.0.2.53"),), dns_v6=(ipaddress.IPv6Address("2001:db8::53"),))
STALE = "is out of date: run `make docs` and commit the result"


def load_file(path: Path) -> config.Config:
    return config.load({}, {}, config.read_toml(str(path)), str(path))


def targets(ruleset: Ruleset) -> set[tuple[str, int]]:
    """Where the ruleset sends captured traffic: ("redirect"|"tproxy", port)."""
    out = set()
    for chain in ruleset.chains:
        for rule in chain.rules:
            for action in rule.actions:
                if isinstance(action, Redirect):
                    out.add(("redirect", action.port))
                if isinstance(action, TProxy):
                    out.add(("tproxy", action.port))
    return out


def test_toml_reference_is_current() -> None:
    text = (ROOT / docs.TOML_PATH).read_text(encoding="utf-8")
    assert text == docs.toml_reference(), f"{docs.TOML_PATH} {STALE}"


def test_readme_reference_is_current() -> None:
    readme = (ROOT / docs.README_PATH).read_text(encoding="utf-8")
    assert readme == docs.splice(readme, docs.readme_reference()), f"README.md's reference {STALE}"


def test_readme_reference_names_every_command_and_option() -> None:
    reference = docs.readme_reference()
    for option in config.OPTIONS:
        assert f"| `{option.flag}` |" in reference and f"`{option.key}`" in reference
        for env in option.envs:
            assert f"`{env}`" in reference
    for command in ("render", "apply", "cleanup", "status", "validate"):
        assert f"| `{command}` |" in reference


def test_splice_refuses_a_document_without_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        docs.splice("# no markers here\n", "body")


def test_toml_reference_uncommented_is_the_defaults(tmp_path: Path) -> None:
    """Every key appears once, and the values written are exactly what config.load uses by default."""
    text = (ROOT / docs.TOML_PATH).read_text(encoding="utf-8")
    assigned = re.findall(r"^# (\w+) = (.*)$", text, flags=re.MULTILINE)
    assert sorted(key for key, _ in assigned) == sorted(o.key for o in config.OPTIONS)
    active = tmp_path / "all.toml"
    active.write_text("\n".join(f"{key} = {value}" for key, value in assigned), encoding="utf-8")
    assert load_file(active) == config.load({}, {})


def test_every_example_loads_and_renders() -> None:
    assert {p.name for p in EXAMPLES} >= {"istio-default.toml", "istio-dns-dualstack.toml", "istio-tproxy.toml",
                                          "linkerd.toml"}
    for path in EXAMPLES:
        ruleset = render(load_file(path), FACTS)
        assert targets(ruleset), f"{path.name} captures nothing"


def test_istio_examples_match_istio_init() -> None:
    default = load_file(ROOT / "config/examples/istio-default.toml")
    assert default.proxy_uid == default.proxy_gid == (1337,)
    assert [str(p) for p in default.local_exclude_ports] == ["15090", "15021", "15020"]
    assert default.inbound_ports is None and default.service_cidr is None  # '*'
    assert targets(render(default, FACTS)) == {("redirect", 15001), ("redirect", 15006)}

    dns = load_file(ROOT / "config/examples/istio-dns-dualstack.toml")
    assert dns.redirect_dns and dns.dual_stack
    assert ("redirect", 15053) in targets(render(dns, FACTS))

    tproxy = load_file(ROOT / "config/examples/istio-tproxy.toml")
    ruleset = render(tproxy, FACTS)
    assert ("tproxy", 15006) in targets(ruleset) and ruleset.routes


def test_ambient_example_matches_istio_cni() -> None:
    ambient = load_file(ROOT / "config/examples/istio-ambient.toml")
    ruleset = render(ambient, FACTS)
    assert ambient.ambient and targets(ruleset) == {("redirect", 15001), ("redirect", 15006), ("redirect", 15053)}
    assert [(r.mark, r.mask, r.table) for r in ruleset.routes] == [(0x111, 0xFFF, 100)] * 2  # dual-stack facts


def test_linkerd_example_matches_proxy_init() -> None:
    linkerd = load_file(ROOT / "config/examples/linkerd.toml")
    ruleset = render(linkerd, FACTS)
    assert targets(ruleset) == {("redirect", 4140), ("redirect", 4143)}
    assert linkerd.proxy_uid == (2102,)
    assert {str(p) for p in linkerd.local_exclude_ports} == {"4190", "4191", "4567", "4568"}
    assert {str(p) for p in linkerd.local_outbound_ports_exclude} == {"4567", "4568"}
    assert ruleset.set("exclude-interfaces").elements == ("lo",)
    # The one port interceptd always leaves uncaptured is the inbound proxy port itself.
    assert linkerd.inbound_tunnel_port == linkerd.inbound_capture_port


def test_containerfile_matches_the_package() -> None:
    text = (ROOT / "Containerfile").read_text(encoding="utf-8")
    assert f"ARG VERSION={__version__}\n" in text
    host, port = config.load({}, {}).metrics_address or ("", 0)
    assert f"http://{host}:{port}/healthz" in text
    assert 'ENTRYPOINT ["interceptd"]' in text
    assert "config/container/install.sh --image" in text
    toml = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert toml["project"]["version"] == __version__
