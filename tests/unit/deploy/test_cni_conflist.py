"""config/cni/*.conflist, the examples for podman and CRI-O: a CNI 1.0 chain that ends with interceptd-cni, whose
settings ADD accepts. tests/integration/runtime/test_podman.py runs the same file under podman, with only the
subnet and the paths substituted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from interceptd.cli import cni
from interceptd.runtime.nodestate import settings_config

CONFLISTS = sorted((Path(__file__).resolve().parents[3] / "config" / "cni").glob("*.conflist"))


def test_there_is_an_example() -> None:
    assert [p.name for p in CONFLISTS] == ["87-interceptd.conflist"]


@pytest.mark.parametrize("path", CONFLISTS, ids=lambda p: p.name)
def test_the_chain_ends_with_interceptd_cni_and_its_settings_are_accepted(path: Path) -> None:
    conf: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert conf["cniVersion"] in cni.SUPPORTED_VERSIONS and conf["name"]
    *network, plugin = conf["plugins"]
    assert plugin["type"] == "interceptd-cni" and all(p["type"] != "interceptd-cni" for p in network)
    # The same checks ADD makes, with the settings the plugin is given; the node agent's state directory.
    assert cni.install_settings(json.dumps(plugin["interceptd"])) == plugin["interceptd"]
    settings = cni.pod_settings(plugin, {"K8S_POD_NAME": "web"})
    assert settings is not None
    config = settings_config(settings, str(path))
    assert config.state_dir == "/run/interceptd" and not config.dry_run
    # Kubernetes' system pods are left alone (CRI-O passes K8S_POD_NAMESPACE; podman passes none).
    assert cni.pod_settings(plugin, {"K8S_POD_NAMESPACE": "kube-system"}) is None
