"""config/kubernetes/: every manifest is valid for Kubernetes 1.31 and the newest schemas kubernetes-validate
ships (offline), and the interceptd containers in it are what the README promises: only NET_ADMIN, a
read-only root, command lines interceptd itself accepts, probes on its metrics port."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from interceptd import __version__
from interceptd.cli import commands
from interceptd.cli import main as cli
from interceptd.config import options as config

ROOT = Path(__file__).resolve().parents[3]
KUBE = ROOT / "config" / "kubernetes"
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def resources() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def pods() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in resources() if doc["kind"] == "Pod"}


def interceptd_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [c for c in spec.get("initContainers", []) + spec["containers"] if c["image"].startswith("interceptd:")]


def configmap_toml(tmp_path: Path) -> Path:
    (configmap,) = [doc for doc in resources() if doc["kind"] == "ConfigMap"]
    path = tmp_path / "interceptd.toml"
    path.write_text(configmap["data"]["interceptd.toml"], encoding="utf-8")
    return path


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_rejects_an_unknown_field() -> None:
    """The check above is strict: a misspelt field fails it."""
    pod = pods()["app-with-interceptd-init"]
    broken = {**pod, "spec": {**pod["spec"], "initContainer": pod["spec"]["initContainers"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(KUBE / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert kustomization["images"] == [{"name": "interceptd", "newName": "interceptd", "newTag": __version__}]


def test_interceptd_containers_need_only_net_admin_and_a_read_only_root() -> None:
    found = [c for pod in pods().values() for c in interceptd_containers(pod)]
    assert len(found) == 2
    for container in found:
        assert container["image"] == f"interceptd:{__version__}"
        security = container["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False


def test_init_container_runs_istio_init_arguments_through_apply() -> None:
    (init,) = pods()["app-with-interceptd-init"]["spec"]["initContainers"]
    assert "restartPolicy" not in init
    args, cfg = cli.parse(init["args"])
    assert args.command == "apply"
    assert (cfg.envoy_port, cfg.inbound_capture_port, cfg.proxy_uid) == (15001, 15006, (1337,))
    assert cfg.inbound_ports is None and cfg.service_cidr is None
    assert [str(p) for p in cfg.local_exclude_ports] == ["15090", "15021", "15020"]


def test_native_sidecar_runs_the_agent_on_the_configmap(tmp_path: Path) -> None:
    pod = pods()["app-with-interceptd-sidecar"]
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    command, option, config_path = sidecar["args"]
    assert (command, option) == ("run", "--config")

    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_dir = str(Path(config_path).parent)
    # Mounted as a directory (a subPath mount would never see an edited ConfigMap).
    assert all("subPath" not in m for m in sidecar["volumeMounts"])
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "interceptd-config"

    args, cfg = cli.parse([command, option, str(configmap_toml(tmp_path))])
    assert args.command == "run"
    # An emptyDir is 0777, which interceptd refuses as its state directory: a subdirectory of it is created 0700.
    shared = str(Path(cfg.state_dir).parent)
    assert shared in mounts and "emptyDir" in volumes[mounts[shared]]
    assert cfg.metrics_address is not None
    host, port = cfg.metrics_address
    assert host == "0.0.0.0"  # the kubelet and Prometheus connect to the pod's address

    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["metrics"] == port
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "metrics"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_configmap_matches_the_istio_default_example(tmp_path: Path) -> None:
    """The ConfigMap is istio-default.toml plus the metrics listener, the log format and the state directory."""
    from_map = config.read_toml(str(configmap_toml(tmp_path)))
    example = config.read_toml(str(ROOT / "config" / "examples" / "istio-default.toml"))
    assert {k: v for k, v in from_map.items() if k not in ("metrics_address", "log_format", "state_dir")} == example


def test_istio_injection_template_spellings_all_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Istio's template runs `istio-iptables ARGS` as the command, or passes `istio-iptables ARGS` to the
    image's entrypoint (interceptd); pilot-agent's `istio-iptables istio-iptables ARGS` reaches the alias."""
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(commands, "cmd_apply", lambda args, cfg: seen.append((args.command, cfg.envoy_port)) or 0)
    assert cli.run_command(["istio-iptables", "-p", "15009"]) == 0
    monkeypatch.setattr("os._exit", sys.exit)  # the alias ends the process at once (cli.main.exit_one_shot)
    for argv in (["-p", "15010"], ["istio-iptables", "-p", "15011"]):
        monkeypatch.setattr("sys.argv", ["istio-iptables", *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.istio_iptables_main()
        assert exit_.value.code == 0
    assert seen == [("apply", 15009), ("apply", 15010), ("apply", 15011)]
