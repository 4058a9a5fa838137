"""The CNI plugin's pure parts: request parsing and how a pod's settings are derived (as Istio CNI
derives them: docs/istio-compatibility.md, "How Istio calls it")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from interceptd.cli import cni
from interceptd.config.values import parse_cidr
from interceptd.errors import ConfigError
from interceptd.runtime.nodestate import settings_config

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/p", "CNI_IFNAME": "eth0"}
CONF = '{"cniVersion": "1.0.0", "name": "n", "type": "interceptd-cni"}'


def test_istio_cni_defaults_without_annotations() -> None:
    settings = cni.pod_settings({}, {})
    assert settings is not None
    config = settings_config(settings, "test")
    assert config.service_cidr is None and config.inbound_ports is None  # '*'
    assert config.proxy_uid == (1337,) and config.proxy_gid == (1337,)
    assert [p.first for p in config.local_exclude_ports] == [15020, 15021, 15090]
    assert [p.first for p in config.local_outbound_ports_exclude] == [15020]
    assert config.inbound_interception_mode == "REDIRECT"


def test_annotations_beat_the_network_config_and_inbound_exclusions_are_merged() -> None:
    conf = {"interceptd": {"service_exclude_cidr": ["10.96.0.0/12"], "local_exclude_ports": [22]}}
    args = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "203.0.113.0/24",
            "traffic.sidecar.istio.io/excludeInboundPorts": "8443,15021",
            "sidecar.istio.io/interceptionMode": "TPROXY", "K8S_POD_NAME": "web"}
    settings = cni.pod_settings(conf, args)
    assert settings is not None
    config = settings_config(settings, "test")
    assert config.service_exclude_cidr == (parse_cidr("203.0.113.0/24"),)
    assert [p.first for p in config.local_exclude_ports] == [8443, 15021, 15020, 15090]
    assert config.tproxy
    # Without the annotation, the network config's own value is used (then the sidecar's ports).
    settings = cni.pod_settings(conf, {})
    assert settings is not None and settings["local_exclude_ports"] == "22,15020,15021,15090"


def test_dns_capture_in_a_pod_captures_all_dns() -> None:
    settings = cni.pod_settings({"interceptd": {"redirect_dns": True}}, {})
    assert settings is not None and settings["capture_all_dns"] is True


@pytest.mark.parametrize(("conf", "args"), [({"exclude_namespaces": ["kube-system"]},
                                             {"K8S_POD_NAMESPACE": "kube-system"}),
                                            ({}, {"sidecar.istio.io/interceptionMode": "NONE"})])
def test_pods_left_alone(conf: dict[str, object], args: dict[str, str]) -> None:
    assert cni.pod_settings(conf, args) is None


@pytest.mark.parametrize(("conf", "args", "words"), [
    ({"interceptd": "x"}, {}, "'interceptd' must be an object"),
    ({"interceptd": {"bogus": 1}}, {}, "unknown key 'bogus'"),
    ({}, {"traffic.sidecar.istio.io/includeInboundPorts": "http"}, "includeInboundPorts: invalid value 'http'"),
    ({"exclude_namespaces": "kube-system"}, {}, "exclude_namespaces"),
    ({"interceptd": {"own_table": True}}, {}, "key 'own_table' cannot be used with the CNI plugin"),
])
def test_bad_settings_name_the_culprit(conf: dict[str, object], args: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        cni.pod_settings(conf, args)


def test_cni_args_parsing() -> None:
    assert cni.parse_cni_args("IgnoreUnknown=1;a/b=1,2;c=x=y;") == {"IgnoreUnknown": "1", "a/b": "1,2", "c": "x=y"}
    with pytest.raises(cni.CniError, match="malformed element 'oops'"):
        cni.parse_cni_args("a=1;oops")


@pytest.mark.parametrize(("env", "stdin", "code"), [
    ({**ENV, "CNI_COMMAND": "RUN"}, CONF, cni.E_ENV),
    ({**ENV, "CNI_IFNAME": ""}, CONF, cni.E_ENV),
    (ENV, "[]", cni.E_DECODE),
    (ENV, '{"cniVersion": "1.0.0", "name": "n"}', cni.E_CONFIG),
    ({**ENV, "CNI_COMMAND": "CHECK"}, '{"cniVersion": "0.3.1", "name": "n", "type": "t"}', cni.E_VERSION),
    (ENV, "[" * 100_000 + "]" * 100_000, cni.E_DECODE),
    (ENV, '{"cniVersion": "1.0.0", "name": "n", "type": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     cni.E_DECODE),
    (ENV, CONF + " " * (16 * 1024 * 1024), cni.E_DECODE),  # over the size limit, valid JSON all the same
    (ENV, CONF[:-1] + ', "interceptd": {"own_table": true}}', cni.E_CONFIG),
])
def test_bad_requests_get_the_spec_error_json(env: dict[str, str], stdin: str, code: int) -> None:
    rc, out = cni.run(env, stdin)
    assert rc == 1 and out["code"] == code and out["msg"] and out["cniVersion"]


def test_del_needs_no_netns_and_version_needs_no_config() -> None:
    assert cni.parse_request({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, CONF).netns_path == ""
    rc, out = cni.run({"CNI_COMMAND": "VERSION"}, "")
    assert rc == 0 and out["supportedVersions"] == list(cni.SUPPORTED_VERSIONS)


def test_install_chains_into_the_first_conflist_once(tmp_path: Path) -> None:
    first = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}
    (tmp_path / "10-k8s.conflist").write_text(json.dumps(first))
    (tmp_path / "20-other.conflist").write_text(json.dumps({**first, "name": "other"}))
    plugin = {"type": "interceptd-cni", "interceptd": {"state_dir": "/run/interceptd"}}
    for _ in range(2):  # an upgrade re-runs the init step
        assert cni.install_conflist(str(tmp_path), plugin) == str(tmp_path / "10-k8s.conflist")
    chained = json.loads((tmp_path / "10-k8s.conflist").read_text())
    assert [p["type"] for p in chained["plugins"]] == ["bridge", "portmap", "interceptd-cni"]
    assert json.loads((tmp_path / "20-other.conflist").read_text())["plugins"] == first["plugins"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .conflist"):
        cni.install_conflist(str(tmp_path / "empty"), plugin)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["interceptd-cni", *argv])
    monkeypatch.setattr("os._exit", sys.exit)  # main ends the process at once (cli.main.exit_one_shot)
    with pytest.raises(SystemExit) as exited:
        cni.main()
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(("settings", "words"), [
    ("[" * 100_000, "SETTINGS_JSON: not JSON: nested too deeply"),
    ("[[[", "SETTINGS_JSON: not JSON"),
    ('{"envoy_port": 70000}', "key 'envoy_port': invalid value '70000'"),
    ('{"nope": 1}', "unknown key 'nope'"),
    ('{"own_table": true}', "own_table"),
    ('{"exclude_interfaces": ["@x"]}', "'@x' is not a valid interface name"),
    ("[]", "'interceptd' must be an object"),
])
def test_install_refuses_settings_every_add_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], settings: str,
                                                        words: str) -> None:
    conflist = tmp_path / "10-k8s.conflist"
    before = json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]})
    conflist.write_text(before)
    code, err = run_main(monkeypatch, capsys, "install", str(tmp_path), settings)
    assert code == 2 and words in err and err.count("\n") == 1 and len(err) < 400, err
    assert conflist.read_text() == before


def test_install_writes_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "10-k8s.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "k", "plugins": []}))
    code, err = run_main(monkeypatch, capsys, "install", str(tmp_path), '{"service_exclude_cidr": ["192.0.2.0/24"]}')
    assert code == 0, err
    plugins = json.loads((tmp_path / "10-k8s.conflist").read_text())["plugins"]
    assert plugins == [{"type": "interceptd-cni", "interceptd": {"service_exclude_cidr": ["192.0.2.0/24"]}}]
