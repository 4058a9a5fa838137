"""The node agent's live per-pod settings, readiness and metric labels, over fakes.

Pods are CNI-registered (a state record with the pod's Kubernetes namespace and name, as the plugin writes
it), each namespace a plain file with its own FakeKernel; the settings directory is a temporary directory.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.nodefakes import FakeNode

from interceptd.config import options as config
from interceptd.ruleset import names as N
from interceptd.runtime import nodestate
from interceptd.runtime.node import Node, NodeCollector
from interceptd.runtime.podsettings import PodFiles, stems
from interceptd.runtime.readiness import READY_FILE
from interceptd.system.fake import FakeKernel

TABLE = ("inet", "interceptd")
POD_SETTINGS = {"service_cidr": "*", "inbound_ports": "*", "service_exclude_cidr": "203.0.113.0/25"}
EXCLUDE_V4 = N.SET_EXCLUDE_CIDRS[4]


class Pods(FakeNode):
    """A node's CNI pods, and the live settings directory."""

    def __init__(self, tmp: Path) -> None:
        state, self.settings = tmp / "state", tmp / "settings"
        self.settings.mkdir()
        super().__init__(tmp / "netns", state, config.load({"netns_dir": "", "state_dir": str(state),
                                                            "netns_config_dir": str(self.settings)}, {}))

    def write(self, stem: str, text: str) -> None:
        tmp = self.settings / f".{stem}.tmp"
        tmp.write_text(text)
        tmp.replace(self.settings / f"{stem}.toml")


def _elements(kernel: FakeKernel, name: str = EXCLUDE_V4) -> list[object]:
    return list(kernel.tables[TABLE]["sets"][name]["elem"])


def _handles(kernel: FakeKernel) -> list[int]:
    return [r["handle"] for r in kernel.tables[TABLE]["rules"]]


@pytest.fixture
def pods(tmp_path: Path) -> Pods:
    return Pods(tmp_path)


@pytest.fixture
def node(pods: Pods) -> Iterator[Node]:
    pods.cni("pod-a", POD_SETTINGS, pod=("demo", "web-1"))
    pods.cni("pod-b", POD_SETTINGS)
    n = pods.node()
    n._first_tick()
    assert sorted(n.members) == ["pod-a", "pod-b"] and n.ready()
    yield n
    n.loop.close()


def test_a_changed_settings_file_rewrites_only_that_pods_changed_sets(pods: Pods, node: Node) -> None:
    a, b = pods.kernel("pod-a"), pods.kernel("pod-b")
    counter = N.counter_name(N.ISTIO_OUTPUT, N.per_family(N.RULE_EXCLUDE_CIDRS_RETURN, 4))
    a.count("interceptd", counter, 7, 700)
    handles, applies_b = _handles(a), b.applies
    pods.write("demo_web-1", 'service_exclude_cidr = ["203.0.113.128/25", "198.51.100.0/24"]\n')
    node.apply_pod_settings()
    assert _elements(a) == [{"prefix": {"addr": "198.51.100.0", "len": 24}},
                            {"prefix": {"addr": "203.0.113.128", "len": 25}}]
    assert _handles(a) == handles  # no rule was rewritten
    assert a.tables[TABLE]["counters"][counter]["packets"] == 7  # the counter continues
    assert node.members["pod-a"].controller.state.generation == 2
    assert b.applies == applies_b and node.members["pod-b"].controller.state.generation == 1
    # The same bytes again (a ConfigMap swap that left this pod's file as it was): nothing is done.
    applies_a = a.applies
    pods.write("demo_web-1", 'service_exclude_cidr = ["203.0.113.128/25", "198.51.100.0/24"]\n')
    node.apply_pod_settings()
    assert a.applies == applies_a
    # The record keeps the pod's ADD settings and the new reference, so a restart adopts the table untouched.
    record = nodestate.read(str(pods.state), "pod-a")
    assert record is not None and record.settings == POD_SETTINGS and record.pod == ("demo", "web-1")
    again = pods.node()
    try:
        again._first_tick()
        assert a.applies == applies_a and again.ready()
    finally:
        again.loop.close()


def test_a_pod_without_kubernetes_names_is_keyed_by_its_network_namespace(pods: Pods, node: Node) -> None:
    pods.write("pod-b", 'service_exclude_cidr = "198.51.100.0/24"\n')
    node.apply_pod_settings()
    assert _elements(pods.kernel("pod-b")) == [{"prefix": {"addr": "198.51.100.0", "len": 24}}]
    assert stems("pod-a", ("demo", "web-1")) == ["demo_web-1", "pod-a"]
    assert stems("pod-b", ("", "")) == ["pod-b"]


def test_a_change_that_does_not_parse_is_refused_once_and_the_rules_stay(log: io.StringIO, pods: Pods,
                                                                        node: Node) -> None:
    a = pods.kernel("pod-a")
    before, applies = _elements(a), a.applies
    pods.write("demo_web-1", 'service_exclude_cidr = ["203.0.113.0/33"]\n')
    node.apply_pod_settings()
    node.apply_pod_settings()  # the same bad bytes: not said again
    errors = [e for e in map(json.loads, log.getvalue().splitlines()) if e["event"] == "reload"]
    assert len(errors) == 1, errors
    (line,) = errors
    assert line["netns"] == "pod-a" and line["pod"] == "demo/web-1"
    assert "demo_web-1.toml" in line["error"] and "'service_exclude_cidr'" in line["error"]
    assert _elements(a) == before and a.applies == applies and node.ready()


def test_a_configmap_swap_of_data_is_seen(tmp_path: Path) -> None:
    """Files as symlinks into `..data`, itself a symlink the kubelet renames over: the bytes decide."""
    directory = tmp_path / "cm"
    directory.mkdir()
    for version, text in ((1, "a = 1\n"), (2, "a = 2\n")):
        (directory / f"..v{version}").mkdir()
        (directory / f"..v{version}" / "demo_web-1.toml").write_text(text)
    (directory / "..data").symlink_to("..v1")
    (directory / "demo_web-1.toml").symlink_to("..data/demo_web-1.toml")
    files = PodFiles(str(directory))
    files.take("pod-a", ("demo", "web-1"))
    assert not files.changed("pod-a", ("demo", "web-1"))
    (directory / "..data_tmp").symlink_to("..v2")
    (directory / "..data_tmp").replace(directory / "..data")
    assert files.changed("pod-a", ("demo", "web-1"))
    assert not files.changed("pod-a", ("demo", "web-1"))


def test_sighup_reloads_every_pod_from_its_settings(pods: Pods, node: Node) -> None:
    pods.write("pod-b", 'service_exclude_cidr = "198.51.100.0/24"\n')
    node.reload_all()
    assert _elements(pods.kernel("pod-b")) == [{"prefix": {"addr": "198.51.100.0", "len": 24}}]
    assert node.members["pod-a"].controller.state.generation == 1


def test_the_readiness_file_follows_every_known_pod_verified(pods: Pods, node: Node) -> None:
    ready = pods.state / READY_FILE
    node.tick()
    assert ready.read_text() == "ready: every known pod verified (2)\n"
    assert not [n for n in os.listdir(pods.state) if n.endswith(".tmp")]  # written under another name, renamed
    metrics = {f.name: f for f in NodeCollector(node).collect()}
    assert metrics["interceptd_node_pods_verified"].samples[0].value == 1
    # pod-b's table goes and its repair is refused: not verified, no file, until the retry succeeds.
    kernel = pods.kernel("pod-b")
    del kernel.tables[TABLE]
    kernel.refuse = 1
    node.members["pod-b"].events.seen = True
    node.tick()
    assert not ready.exists() and not node.ready()
    metrics = {f.name: f for f in NodeCollector(node).collect()}
    assert metrics["interceptd_node_pods_verified"].samples[0].value == 0
    assert {s.labels["state"]: s.value for s in metrics["interceptd_node_pods"].samples} == \
        {"verified": 1, "unverified": 1, "unmanaged": 0}
    node.members["pod-b"].controller.retry_at = 0.0
    node.tick()
    assert ready.exists() and node.ready()
    node._close()
    assert not ready.exists()


# Every label of the node agent's per-pod series: bounded by the number of pods, rules and reasons.
POD_LABELS = {"netns", "k8s_namespace", "pod"}
OTHER_LABELS = {"chain", "rule", "trigger", "result", "reason", "kind", "table", "mode", "generation", "source",
                "state", "le", "version"}


def test_per_pod_metric_labels_are_names_never_addresses_or_ports(pods: Pods, node: Node) -> None:
    seen: dict[str, set[str]] = {}
    for family in NodeCollector(node).collect():
        for sample in family.samples:
            assert set(sample.labels) <= POD_LABELS | OTHER_LABELS, (family.name, sample.labels)
            for value in sample.labels.values():
                with pytest.raises(ValueError):
                    ipaddress.ip_network(value, strict=False)  # never an address or a network
            if "netns" in sample.labels:
                seen.setdefault(sample.labels["netns"], set()).add(
                    json.dumps({k: sample.labels[k] for k in sorted(POD_LABELS & set(sample.labels))}))
    assert seen["pod-a"] == {json.dumps({"k8s_namespace": "demo", "netns": "pod-a", "pod": "web-1"})}
    assert seen["pod-b"] == {json.dumps({"netns": "pod-b"})}


def test_a_kernel_that_refuses_the_update_keeps_the_old_rules(pods: Pods, node: Node) -> None:
    a = pods.kernel("pod-a")
    before = _elements(a)
    a.refuse = 2  # the update, then the whole table
    pods.write("demo_web-1", 'service_exclude_cidr = "198.51.100.0/24"\n')
    node.apply_pod_settings()
    assert _elements(a) == before
    assert node.members["pod-a"].controller.state.generation == 1
