"""config/kubernetes/node-daemonset.yaml (validated with the other manifests by test_kubernetes_manifests.py)
runs what interceptd accepts: `node` with its environment, the CNI settings the init step chains, and only
the capabilities the manifest explains."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import yaml

from interceptd.cli import cni
from interceptd.cli import main as cli
from interceptd.config import options as config
from interceptd.runtime.nodestate import settings_config
from interceptd.runtime.readiness import READY_FILE

MANIFEST = Path(__file__).resolve().parents[3] / "config" / "kubernetes" / "node-daemonset.yaml"


def _spec() -> dict[str, Any]:
    (daemonset,) = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    assert daemonset["kind"] == "DaemonSet"
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_the_agent_runs_node_on_cni_registrations_only() -> None:
    (agent,) = _spec()["containers"]
    args, _ = cli.parse(agent["args"])
    assert args.command == "node"
    cfg = config.load({}, _env(agent))
    assert cfg.netns_dir == "" and cfg.state_dir == "/run/interceptd"
    assert cfg.metrics_address is not None
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["metrics"] == cfg.metrics_address[1]
    # hostNetwork: the listener stays on the node's loopback unless the manifest's comment is followed
    assert ipaddress.ip_address(cfg.metrics_address[0]).is_loopback
    for probe in ("startupProbe", "livenessProbe"):
        assert agent[probe]["httpGet"]["host"] == cfg.metrics_address[0]
        assert agent[probe]["httpGet"]["port"] == "metrics"
    assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/interceptd", "/run/netns"} <= mounts


def test_ready_means_every_pod_verified_and_pod_settings_come_from_a_configmap() -> None:
    (agent,) = _spec()["containers"]
    cfg = config.load({}, _env(agent))
    # The readiness file the agent keeps in its state directory while every known pod is verified.
    assert agent["readinessProbe"]["exec"]["command"] == ["test", "-f", os.path.join(cfg.state_dir, READY_FILE)]
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in _spec()["volumes"]}
    settings = volumes[mounts[cfg.netns_config_dir]]
    assert settings["configMap"] == {"name": "interceptd-pod-settings", "optional": True}


def test_the_documented_node_address_binding_is_what_interceptd_accepts() -> None:
    """The commented alternative: the downward API's status.hostIP, expanded by the kubelet into the address."""
    text = MANIFEST.read_text(encoding="utf-8")
    commented = "\n".join(line.split("#", 1)[1][3:] for line in text.splitlines()
                          if line.strip().startswith("#   "))
    env = yaml.safe_load(commented)
    assert env[0] == {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    value = env[1]["value"].replace("$(HOST_IP)", "192.0.2.10")  # what the kubelet does with a node address
    cfg = config.load({}, {"INTERCEPTD_METRICS_ADDRESS": value})
    assert cfg.metrics_address == ("192.0.2.10", 15322)


def test_least_capabilities() -> None:
    spec = _spec()
    (agent,) = spec["containers"]
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert agent["securityContext"]["privileged"] is False
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "SYS_ADMIN" in MANIFEST.read_text(encoding="utf-8").split("add: [NET_ADMIN, SYS_ADMIN]")[0]


def test_the_init_step_chains_valid_settings_with_the_agents_state_dir() -> None:
    (init,) = _spec()["initContainers"]
    settings = json.loads(_env(init)["INTERCEPTD_CNI_SETTINGS"])
    pod = cni.pod_settings({"interceptd": settings}, {})
    assert pod is not None
    assert settings_config(pod, "test").state_dir == config.load({}, _env(_spec()["containers"][0])).state_dir
    script = init["command"][-1]
    assert "-m interceptd.cli.cni install /host/etc/cni/net.d" in script
    assert 'exec /opt/interceptd/bin/python -m interceptd.cli.cni "$@"' in script.replace("\\n", "\n")
