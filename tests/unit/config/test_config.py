"""Configuration: precedence, istio-iptables syntax, and a clear error for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptd.cli import main as cli
from interceptd.config import OPTIONS, load, load_all
from interceptd.config.values import PortRange, parse_cidr
from interceptd.errors import ConfigError


def cfg(flags: dict[str, str] | None = None, env: dict[str, str] | None = None,
        toml: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    return load(flags or {}, env or {}, toml, "test.toml")


def test_defaults_match_istio() -> None:
    c = cfg()
    assert (c.envoy_port, c.inbound_capture_port, c.inbound_tunnel_port) == (15001, 15006, 15008)
    assert c.inbound_interception_mode == "REDIRECT"
    assert (c.inbound_tproxy_mark, c.inbound_tproxy_route_table) == (1337, 133)
    assert c.inbound_ports == () and c.service_cidr == ()
    assert c.outbound_owner_groups is None  # '*'
    assert c.outbound_ipv4_loopback_cidr == parse_cidr("127.0.0.1/32")
    assert c.proxy_gid == c.proxy_uid
    assert c.table == "interceptd"


def test_precedence_defaults_toml_env_flags() -> None:
    assert cfg(toml={"envoy_port": 1}).envoy_port == 1
    assert cfg(toml={"inbound_capture_port": 1}, env={"INBOUND_CAPTURE_PORT": "2"}).inbound_capture_port == 2
    assert cfg(toml={"inbound_capture_port": 1}, env={"INBOUND_CAPTURE_PORT": "2"},
               flags={"inbound_capture_port": "3"}).inbound_capture_port == 3


def test_legacy_env_beats_new_name() -> None:
    assert cfg(env={"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}).redirect_dns is True
    assert cfg(env={"DROP_INVALID": "true", "INVALID_DROP": "false"}).drop_invalid is False
    assert cfg(env={"DUAL_STACK": "0", "ISTIO_DUAL_STACK": "1"}).dual_stack is True


def test_list_syntax_drops_empty_elements_and_merges_nothing_yet() -> None:
    c = cfg(flags={"local_exclude_ports": "6000,7000,", "inbound_ports": "*"})
    assert c.local_exclude_ports == (PortRange(6000, 6000), PortRange(7000, 7000))
    assert c.inbound_ports is None
    assert cfg(flags={"outbound_ports": "8000-9000"}).outbound_ports == (PortRange(8000, 9000),)


def test_cidrs_keep_meaning_with_host_bits() -> None:
    c = cfg(flags={"service_exclude_cidr": "10.0.0.1/8,192.0.2.1"})
    assert c.service_exclude_cidr == (parse_cidr("10.0.0.0/8"), parse_cidr("192.0.2.1/32"))


def test_uids_and_gids_by_name_and_number() -> None:
    c = cfg(flags={"proxy_uid": "root,1337", "proxy_gid": "root"})
    assert c.proxy_uid == (0, 1337) and c.proxy_gid == (0,)
    assert cfg(flags={"proxy_uid": "1337,1338"}).proxy_gid == (1337, 1338)


def test_empty_owner_groups_is_kept_as_istio_does() -> None:
    assert cfg(env={"ISTIO_OUTBOUND_OWNER_GROUPS": ""}).outbound_owner_groups == ()


def test_toml_lists_and_strings() -> None:
    c = cfg(toml={"local_exclude_ports": [15090, 15021], "service_cidr": "*", "redirect_dns": True})
    assert c.local_exclude_ports == (PortRange(15090, 15090), PortRange(15021, 15021))
    assert c.service_cidr is None and c.redirect_dns


BAD_FLAGS = [
    ({"envoy_port": "70000"}, "--envoy-port", "70000"),
    ({"envoy_port": "abc"}, "--envoy-port", "abc"),
    ({"inbound_capture_port": "0"}, "--inbound-capture-port", "0"),
    ({"service_exclude_cidr": "10.0.0.0/33"}, "--istio-service-exclude-cidr", "10.0.0.0/33"),
    ({"service_exclude_cidr": "*"}, "--istio-service-exclude-cidr", "*"),
    ({"service_cidr": "10.0.0.0/8, 10.1.0.0/16"}, "--istio-service-cidr", " 10.1.0.0/16"),
    ({"inbound_interception_mode": "tproxy"}, "--istio-inbound-interception-mode", "tproxy"),
    ({"inbound_interception_mode": "garbage"}, "--istio-inbound-interception-mode", "garbage"),
    ({"proxy_uid": "no-such-user-xyz"}, "--proxy-uid", "no-such-user-xyz"),
    ({"proxy_gid": "no-such-group-xyz"}, "--proxy-gid", "no-such-group-xyz"),
    ({"proxy_uid": "-5"}, "--proxy-uid", "-5"),
    ({"inbound_ports": "80,*"}, "--istio-inbound-ports", "80,*"),
    ({"local_exclude_ports": "90-80"}, "--istio-local-exclude-ports", "90-80"),
    ({"exclude_interfaces": "eth0,a-very-long-interface-name"}, "--istio-exclude-interfaces", "a-very-long"),
    ({"kube_virt_interfaces": 'eth0"; drop'}, "--kube-virt-interfaces", "eth0"),
    ({"inbound_tproxy_mark": "0x539"}, "--istio-inbound-tproxy-mark", "0x539"),
    ({"probe_timeout": "5 seconds"}, "--probe-timeout", "5 seconds"),
    ({"force_iptables_binary": "foo"}, "--force-iptables-binary", "foo"),
    ({"table": "bad name"}, "--table", "bad name"),
    ({"outbound_ipv4_loopback_cidr": "10.0.0.0/8"}, "--outbound-ipv4-loopback-cidr", "10.0.0.0/8"),
    ({"envoy_port": "\u0663"}, "--envoy-port", "\u0663"),  # an Arabic-Indic digit three
    ({"envoy_port": "80\n"}, "--envoy-port", "80\\n"),
    ({"exclude_interfaces": "eth0\n"}, "--istio-exclude-interfaces", "eth0\\n"),
    ({"table": "t\n"}, "--table", "t\\n"),
    ({"service_exclude_cidr": "fe80::1%x/128"}, "--istio-service-exclude-cidr", "fe80::1%x/128"),
    ({"service_cidr": "fe80::%1/64"}, "--istio-service-cidr", "fe80::%1/64"),
    ({"exclude_interfaces": "@x"}, "--istio-exclude-interfaces", "@x"),
    ({"kube_virt_interfaces": "eth@0"}, "--kube-virt-interfaces", "eth@0"),
    ({"envoy_user": "istio\0proxy"}, "--envoy-user", "istio\\x00proxy"),
    ({"envoy_user": "@set"}, "--envoy-user", "@set"),
    ({"reconcile_interval": "1e-300"}, "--reconcile-interval", "from 0.1 to 86400 seconds"),
    ({"reconcile_interval": "0"}, "--reconcile-interval", "from 0.1 to 86400 seconds"),
    ({"reconcile_interval": "nan"}, "--reconcile-interval", "nan"),
]


@pytest.mark.parametrize(("flags", "flag", "value"), BAD_FLAGS, ids=[b[1] + "=" + b[2] for b in BAD_FLAGS])
def test_bad_flag_values_name_flag_and_value(flags: dict[str, str], flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(flags=flags)
    message = str(err.value)
    assert flag in message and value in message and "\n" not in message, message
    assert err.value.exit_code == 2


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment variable ISTIO_INBOUND_PORTS.*'abc'"):
        cfg(env={"ISTIO_INBOUND_PORTS": "abc"})
    with pytest.raises(ConfigError, match="INVALID_DROP.*'maybe'"):
        cfg(env={"INVALID_DROP": "maybe"})


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("envoy_port = 15001\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
        load_all({}, {}, str(path))
    path.write_text('envoy_port = "abc"\n')
    with pytest.raises(ConfigError, match="key 'envoy_port': invalid value 'abc'"):
        load_all({}, {}, str(path))
    path.write_text("envoy_port = [1, 2]\n")
    with pytest.raises(ConfigError, match="key 'envoy_port': expected a number"):
        load_all({}, {}, str(path))
    path.write_text("redirect_dns = 1\n")
    with pytest.raises(ConfigError, match="key 'redirect_dns': expected true or false"):
        load_all({}, {}, str(path))
    path.write_text("envoy_port = \n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_all({}, {}, str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_all({}, {}, str(tmp_path / "missing.toml"))


def test_list_length_is_capped_before_parsing() -> None:
    # 200,001 items of garbage: refused by counting, without one item being parsed (the message says so).
    with pytest.raises(ConfigError, match=r"^flag -x/--istio-service-exclude-cidr: more than the limit of 200000 "):
        cfg(flags={"service_exclude_cidr": ",".join(["garbage"] * 200_001)})
    with pytest.raises(ConfigError, match=r"key 'outbound_ports': 200001 items, more than the limit of 200000$"):
        cfg(toml={"outbound_ports": [80] * 200_001})


def test_a_huge_invalid_list_is_reported_on_one_short_line() -> None:
    with pytest.raises(ConfigError) as err:
        cfg(env={"ISTIO_SERVICE_EXCLUDE_CIDR": ",".join(["192.0.2.0/24"] * 50_000 + ["nope"])})
    assert len(str(err.value)) < 400 and "ISTIO_SERVICE_EXCLUDE_CIDR" in str(err.value) and "'nope'" in str(err.value)


@pytest.mark.parametrize(("text", "reason"), [
    ("envoy_port = 1" + "0" * 4400 + "\n", "4300"),
    ("service_cidr = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ("a = " + "{b = " * 5_000 + "1" + "}" * 5_000 + "\n", "nested too deeply"),
])
def test_hostile_toml_is_one_line(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_all({}, {}, str(path))
    message = str(err.value)
    assert message.startswith(f"--config {str(path)!r}: TOML syntax error") and reason in message, message
    assert "\n" not in message and len(message) < 400


def test_config_file_size_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"#" * (16 * 1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than the limit of 16777216 bytes"):
        load_all({}, {}, str(path))


def test_every_option_has_a_flag_toml_key_and_help() -> None:
    keys = [o.key for o in OPTIONS]
    assert len(keys) == len(set(keys))
    shorts = [o.short for o in OPTIONS if o.short]
    assert len(shorts) == len(set(shorts))
    for option in OPTIONS:
        assert option.help and option.long and option.key.replace("_", "").isalnum()


def test_cli_accepts_istio_spellings() -> None:
    _args, c = cli.parse(["apply", "-p=15002", "--redirect-dns=false", "--capture-all-dns", "-n",
                         "--log_output_level=default:info", "--log_as_json", "-i", "*", "-b", "*"])
    assert c.envoy_port == 15002 and not c.redirect_dns and c.capture_all_dns and c.dry_run
    assert c.service_cidr is None and c.inbound_ports is None
    _args, c = cli.parse(["apply", "--redirect-dns"])
    assert c.redirect_dns


def test_cli_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments: --no-such-flag"):
        cli.parse(["apply", "--no-such-flag"])
    with pytest.raises(ConfigError, match="--redirect-dns.*'maybe'"):
        cli.parse(["apply", "--redirect-dns=maybe"])
