"""The scrape-time Collector and the HTTP endpoints, on the in-memory FakeKernel."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from interceptd.cli import parser as cli_parser
from interceptd.config import options as config
from interceptd.control import install
from interceptd.control.state import AgentState
from interceptd.errors import KernelRefusedError, ListenError
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.render import render
from interceptd.runtime.metrics import Collector, MetricsServer, registry
from interceptd.system.fake import FakeKernel, FakeRouter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class CountingKernel(FakeKernel):
    """Records every listing, and can fail them."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[tuple[str, str]] = []
        self.fail_lists = False

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        self.listed.append((family, table))
        return super().list_table(table, family)

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        self.listed.append((family, table))
        if self.fail_lists:
            raise KernelRefusedError("cannot list counters (fake)")
        return super().list_counters(table, family)


CAPTURE_ALL = {"service_cidr": "*", "inbound_ports": "*"}


def setup(flags: dict[str, str] | None = None) -> tuple[CountingKernel, AgentState, CollectorRegistry]:
    cfg = config.load({**CAPTURE_ALL, **(flags or {})}, {})
    kernel = CountingKernel()
    install.apply(kernel, FakeRouter(), render(cfg, HostFacts(ipv6=False, host_ip=None)))
    kernel.listed.clear()
    state = AgentState(table=cfg.table, mode=cfg.inbound_interception_mode)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(kernel, state))
    return kernel, state, reg


def scrape(reg: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rule(chain: str, name: str, what: str = "packets") -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"interceptd_rule_{what}_total", (("chain", chain), ("rule", name)))


def chain(name: str, what: str = "packets") -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"interceptd_chain_{what}_total", (("chain", name),))


def test_every_chain_and_deciding_rule_is_a_series_with_kernel_values() -> None:
    kernel, _state, reg = setup()
    kernel.count("interceptd", N.counter_name(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL), 3, 180)
    kernel.count("interceptd", N.counter_name(N.ISTIO_REDIRECT, N.ENTRY), 3, 180)
    got = scrape(reg)
    assert got[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL)] == 3
    assert got[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL, "bytes")] == 180
    assert got[chain(N.ISTIO_REDIRECT)] == 3
    assert got[rule(N.ISTIO_OUTPUT, N.UID.proxy_return)] == 0
    assert rule(N.ISTIO_REDIRECT, N.ENTRY) not in got  # the entry counter is the chain's, not a rule's
    names = {labels for (name, labels) in got if name == "interceptd_chain_packets_total"}
    assert {dict(labels)["chain"] for labels in names} == {
        N.PREROUTING, N.OUTPUT, N.ISTIO_INBOUND, N.ISTIO_REDIRECT, N.ISTIO_IN_REDIRECT, N.ISTIO_OUTPUT}


def test_one_list_call_per_scrape_and_only_our_table() -> None:
    kernel, _state, reg = setup({"table": "mesh"})
    kernel.apply({"nftables": [{"add": {"table": {"family": "inet", "name": "other"}}},
                               {"add": {"counter": {"family": "inet", "table": "other", "name": "x/y"}}}]})
    got = scrape(reg)
    assert kernel.listed == [("inet", "mesh")]
    assert not any(dict(labels).get("chain") == "x" for _name, labels in got)


def test_counters_never_go_backwards_when_the_table_is_deleted_and_repaired() -> None:
    kernel, _state, reg = setup()
    ruleset = render(config.load(CAPTURE_ALL, {}), HostFacts(ipv6=False, host_ip=None))
    kernel.count("interceptd", N.counter_name(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL), 5, 300)
    assert scrape(reg)[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL)] == 5
    del kernel.tables[("inet", "interceptd")]  # drift: someone deleted the table, counters included
    install.apply(kernel, FakeRouter(), ruleset)  # the repair creates the counters anew, at zero
    kernel.count("interceptd", N.counter_name(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL), 2, 120)
    got = scrape(reg)
    assert got[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL)] == 7
    assert got[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL, "bytes")] == 420
    # a scrape that finds the table missing, then one after a repair that counted more than before
    del kernel.tables[("inet", "interceptd")]
    assert rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL) not in scrape(reg)
    install.apply(kernel, FakeRouter(), ruleset)
    kernel.count("interceptd", N.counter_name(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL), 9, 540)
    assert scrape(reg)[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL)] == 7 + 9  # 9 > 2: seen missing, not lower


def test_reapply_keeps_named_counter_values() -> None:
    kernel, _state, reg = setup()
    kernel.count("interceptd", N.counter_name(N.ISTIO_INBOUND, N.RULE_REDIRECT_INBOUND_ALL), 4, 240)
    ruleset = render(config.load({**CAPTURE_ALL, "local_exclude_ports": "22"}, {}), HostFacts(False, None))
    install.apply(kernel, FakeRouter(), ruleset)
    got = scrape(reg)
    assert got[rule(N.ISTIO_INBOUND, N.RULE_REDIRECT_INBOUND_ALL)] == 4
    assert got[rule(N.ISTIO_INBOUND, N.RULE_EXCLUDE_INBOUND_PORTS)] == 0


def test_kernel_error_is_counted_and_the_agent_metrics_still_served() -> None:
    kernel, _state, reg = setup()
    kernel.fail_lists = True
    scrape(reg)
    got = scrape(reg)
    assert got[("interceptd_scrape_errors_total", ())] == 2
    assert not any(name.startswith("interceptd_rule_") for name, _ in got)
    assert got[("interceptd_ready", ())] == 0
    kernel.fail_lists = False
    assert scrape(reg)[rule(N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL)] == 0


def test_agent_state_families() -> None:
    _kernel, state, reg = setup()
    with state.lock:
        state.generation = 3
        state.ready = True
        state.applies[("start", "success")] += 1
        state.applies[("repair", "success")] += 2
        state.drift_repairs["table missing"] += 2
        state.reconcile_checks[("event", "drift")] += 2
        state.apply_durations.observe(0.004)
        state.apply_durations.observe(0.3)
        state.reloads["error"] += 1
        state.last_reload_successful = False
        state.last_reload_success_ts = 1700000000.0
    got = scrape(reg)
    assert got[("interceptd_applies_total", (("result", "success"), ("trigger", "repair")))] == 2
    assert got[("interceptd_applies_total", (("result", "error"), ("trigger", "reload")))] == 0  # pre-filled
    assert got[("interceptd_drift_repairs_total", (("reason", "table missing"),))] == 2
    assert got[("interceptd_drift_repairs_total", (("reason", "rule removed"),))] == 0  # pre-filled
    assert got[("interceptd_reconcile_checks_total", (("result", "drift"), ("trigger", "event")))] == 2
    assert got[("interceptd_reconcile_checks_total", (("result", "match"), ("trigger", "timer")))] == 0
    assert got[("interceptd_apply_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("interceptd_apply_duration_seconds_bucket", (("le", "0.5"),))] == 2
    assert got[("interceptd_apply_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("interceptd_apply_duration_seconds_count", ())] == 2
    assert got[("interceptd_apply_duration_seconds_sum", ())] == pytest.approx(0.304)
    assert got[("interceptd_config_reloads_total", (("result", "error"),))] == 1
    assert got[("interceptd_config_last_reload_successful", ())] == 0
    assert got[("interceptd_config_last_reload_success_timestamp_seconds", ())] == 1700000000.0
    assert got[("interceptd_ruleset_info", (("generation", "3"), ("mode", "REDIRECT"),
                                            ("table", "interceptd")))] == 1
    assert ("interceptd_build_info", (("version", "0.1.0"),)) in got
    assert got[("interceptd_ready", ())] == 1
    assert got[("interceptd_scrape_duration_seconds", ())] > 0


@pytest.fixture
def server() -> Iterator[tuple[MetricsServer, CountingKernel, AgentState]]:
    kernel, state, _reg = setup()
    srv = MetricsServer(("127.0.0.1", 0), kernel, state).start()
    try:
        yield srv, kernel, state
    finally:
        srv.stop()


def get(srv: MetricsServer, path: str, accept: str = "") -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoints(server: tuple[MetricsServer, CountingKernel, AgentState]) -> None:
    srv, kernel, state = server
    code, ctype, body = get(srv, "/metrics")
    assert (code, ctype.split(";")[0]) == (200, "text/plain")
    assert "interceptd_rule_packets_total{" in body and "process_resident_memory_bytes" in body
    assert kernel.listed == [("inet", "interceptd")]
    code, ctype, body = get(srv, "/metrics", "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    assert "# TYPE interceptd_build info" in body
    assert get(srv, "/healthz")[0] == 200
    with state.lock:
        state.last_error = "table inet interceptd is missing"
    code, _, body = get(srv, "/readyz")
    assert code == 503 and "table inet interceptd is missing" in body
    state.probe = lambda: True
    assert get(srv, "/readyz")[:1] == (200,)
    assert get(srv, "/nope")[0] == 404


def test_listen_error_names_the_flag() -> None:
    kernel, state, _reg = setup()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=rf"--metrics-address 127\.0\.0\.1:{port}: cannot listen"):
            MetricsServer(("127.0.0.1", port), kernel, state)


def test_private_registry_has_no_default_python_collectors() -> None:
    kernel, state, _reg = setup()
    body = generate_latest(registry(kernel, state)).decode()
    assert "python_gc_objects_collected_total" not in body and "python_info" not in body
    assert "process_cpu_seconds_total" in body


def test_run_help_says_nat_chains_count_connections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_parser.build_parser().parse_args(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(cli_parser.NAT_NOTE.split()) in shown
    assert "count connections" in cli_parser.NAT_NOTE
