"""Metrics of a running agent in the lab: real connections, real scrapes, a real Prometheus server.

Every connection here is new, so each nat-chain counter moves by exactly one per connection; the test's
own scrapes go over lo as root and are counted by `app-loopback-uid-return`, never by the rules checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.netlab import INTERCEPTD, ROOT, Lab, call_in, enter, wait_until

from interceptd.ruleset import names

N = 5
PROXY_UID = 1337
SETTINGS = 'inbound_ports = "*"\nlocal_exclude_ports = "2222"\nservice_cidr = "*"\nproxy_uid = "1337"\n'
METRICS = "127.0.0.1:15321"
Series = tuple[str, tuple[tuple[str, str], ...]]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def get_in(lab: Lab, ns: str, url: str) -> tuple[int, str]:
    return tuple(call_in(ns, http_get, url))  # type: ignore[return-value]


def parse(text: str) -> dict[Series, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_text(lab: Lab, address: str = METRICS) -> str:
    code, body = get_in(lab, lab.pod, f"http://{address}/metrics")
    assert code == 200, body
    return body


def scrape(lab: Lab) -> dict[Series, float]:
    return parse(scrape_text(lab))


def rule(chain: str, name: str) -> Series:
    return ("interceptd_rule_packets_total", (("chain", chain), ("rule", name)))


def chain(name: str) -> Series:
    return ("interceptd_chain_packets_total", (("chain", name),))


REPAIRS: Series = ("interceptd_applies_total", (("result", "success"), ("trigger", "repair")))


@contextmanager
def agent(lab: Lab, workdir: Path, *args: str, wrapper: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """`interceptd run` in the pod namespace until the block ends; ready when /readyz says so.

    `wrapper`: a command that runs it (`prlimit --nofile=...`)."""
    log = (workdir / "agent.log").open("wb")
    proc = subprocess.Popen([*wrapper, "ip", "netns", "exec", lab.pod, INTERCEPTD, "run", "--state-dir",
                             str(workdir / "state"), "--log-format", "json", *args],
                            stdout=log, stderr=subprocess.STDOUT)
    address = next((a.split("=", 1)[1] for a in args if a.startswith("--metrics-address=")), METRICS)
    try:
        ready = wait_until(lambda: proc.poll() is None and get_in(lab, lab.pod, f"http://{address}/readyz")[0] == 200,
                           timeout=15, step=0.1)
        assert ready, f"agent not ready: {(workdir / 'agent.log').read_text()}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def servers(lab: Lab) -> None:
    lab.serve(lab.pod, "proxy-in", tcp=[15006])
    lab.serve(lab.pod, "proxy-out", tcp=[15001])
    lab.serve(lab.pod, "app", tcp=[2222, 8080])
    lab.serve(lab.peer, "peer", tcp=[80])


def kinds(lab: Lab) -> dict[Series, tuple[Callable[[], str], str]]:
    """For each kind of connection: the rule that decides it, how to make one, what must answer."""
    return {
        rule(names.ISTIO_INBOUND, names.RULE_REDIRECT_INBOUND_ALL):
            (lambda: lab.request(lab.peer, lab.pod_ip, 8080), "proxy-in 15006 192.0.2.2:8080"),
        rule(names.ISTIO_INBOUND, names.RULE_EXCLUDE_INBOUND_PORTS):
            (lambda: lab.request(lab.peer, lab.pod_ip, 2222), "app 2222 -"),
        rule(names.ISTIO_OUTPUT, names.RULE_REDIRECT_OUTBOUND_ALL):
            (lambda: lab.request(lab.pod, "198.51.100.1", 80), "proxy-out 15001 198.51.100.1:80"),
        rule(names.ISTIO_OUTPUT, names.UID.proxy_return):
            (lambda: lab.request(lab.pod, "198.51.100.1", 80, uid=PROXY_UID, gid=PROXY_UID), "peer 80 -"),
    }


def connect_each(lab: Lab, n: int) -> None:
    for make, answer in kinds(lab).values():
        for _ in range(n):
            got = make()
            assert got.startswith(answer), f"expected {answer!r}, got {got!r}"


def rules_of(samples: dict[Series, float], lab: Lab) -> dict[Series, float]:
    keys = [*kinds(lab), chain(names.ISTIO_IN_REDIRECT), chain(names.ISTIO_REDIRECT)]
    return {key: samples[key] for key in keys}


def nft(lab: Lab, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.pod, "nft", *args], check=True, capture_output=True)


def wait_for(lab: Lab, series: Series, above: float) -> dict[Series, float]:
    got: dict[Series, float] = {}

    def done() -> bool:
        got.update(scrape(lab))
        return got.get(series, 0) > above

    assert wait_until(done, timeout=10, step=0.05), f"{series} stayed at {got.get(series)}"
    return got


def test_rule_counters_rise_by_exactly_n_and_survive_repairs_and_reloads(lab: Lab, tmp_path: Path) -> None:
    servers(lab)
    conf = tmp_path / "interceptd.toml"
    conf.write_text(SETTINGS)
    with agent(lab, tmp_path, "--config", str(conf)) as proc:
        before = rules_of(scrape(lab), lab)
        connect_each(lab, N)
        after = rules_of(scrape(lab), lab)
        assert after == {key: value + N for key, value in before.items()}

        # Drift that keeps the named counters (a chain flushed): the repair finds them with their values.
        samples = scrape(lab)
        nft(lab, "flush", "chain", "inet", "interceptd", names.ISTIO_OUTPUT)
        repaired = wait_for(lab, REPAIRS, samples.get(REPAIRS, 0))
        assert rules_of(repaired, lab) == after

        # Drift that takes the counters along (the table deleted): the exported values do not fall.
        nft(lab, "delete", "table", "inet", "interceptd")
        repaired = wait_for(lab, REPAIRS, repaired[REPAIRS])
        assert rules_of(repaired, lab) == after
        connect_each(lab, N)
        after_repair = rules_of(scrape(lab), lab)
        assert after_repair == {key: value + N for key, value in after.items()}

        # A SIGHUP reload that changes the ruleset (one more excluded port): a re-apply, values kept.
        generation = next(labels for name, labels in repaired if name == "interceptd_ruleset_info")
        conf.write_text(SETTINGS.replace('"2222"', '"2222,2223"'))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: not any(name == "interceptd_ruleset_info" and labels == generation
                                          for name, labels in scrape(lab)), timeout=10)
        reloaded = scrape(lab)
        assert reloaded[("interceptd_config_last_reload_successful", ())] == 1
        assert rules_of(reloaded, lab) == after_repair
        connect_each(lab, N)
        assert rules_of(scrape(lab), lab) == {key: value + N for key, value in after_repair.items()}


def test_promtool_finds_nothing_to_complain_about(lab: Lab, tmp_path: Path) -> None:
    servers(lab)
    with agent(lab, tmp_path, "-b", "*", "-i", "*", "-d", "2222"):
        connect_each(lab, 1)
        for text in (scrape_text(lab), scrape_text(lab)):
            result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_metrics_port_on_a_pod_address_is_not_captured(lab: Lab, tmp_path: Path, mode: str) -> None:
    """Bound to the pod's address with every inbound port captured, Prometheus outside still reaches it."""
    lab.serve(lab.pod, "proxy-in", tcp=[15006], transparent=mode == "TPROXY")
    address = f"{lab.pod_ip}:15321"
    chain_name = names.ISTIO_INBOUND if mode == "REDIRECT" else names.TPROXY_INBOUND
    with agent(lab, tmp_path, "-b", "*", "-m", mode, f"--metrics-address={address}"):
        assert lab.request(lab.peer, lab.pod_ip, 8080).startswith("proxy-in 15006")  # capture is on
        code, body = get_in(lab, lab.peer, f"http://{address}/metrics")
        assert code == 200 and "interceptd_build_info" in body
        assert get_in(lab, lab.peer, f"http://{address}/readyz")[0] == 200
        assert parse(body)[rule(chain_name, names.RULE_METRICS_PORT_RETURN)] >= 1


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not followed by '(' (functions) and not labels."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}|\b(by|without)\s*\([^)]*\)", "", without_strings)
    names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()", without_labels))
    return {n for n in names if "_" in n and not n.startswith("__")}


def promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "10s").replace("$instance", ".*")


def query(lab: Lab, base: str, expr: str) -> list[dict[str, object]]:
    code, body = get_in(lab, lab.pod, f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert code == 200, f"{expr}: {body}"
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


@contextmanager
def prometheus(lab: Lab, workdir: Path, port: int = 19090) -> Iterator[str]:
    """Debian's Prometheus in the pod namespace on loopback, with the example scrape config at 1s."""
    example = (ROOT / "config" / "prometheus-scrape.yml").read_text()
    config = workdir / "prometheus.yml"
    config.write_text(example.replace("scrape_interval: 15s", "scrape_interval: 1s")
                      .replace("scrape_timeout: 5s", "scrape_timeout: 1s"))
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, "prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: get_in(lab, lab.pod, f"{base}/-/ready")[0] == 200, timeout=30, step=0.2), \
            (workdir / "prometheus.log").read_text()[-2000:]
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_reads_the_intercepted_connection_rate(lab: Lab, tmp_path: Path) -> None:
    """The whole path a user has: agent -> Prometheus (real server, 1s scrapes) -> its HTTP API."""
    assert os.access("/usr/bin/prometheus", os.X_OK), "Debian's prometheus package is missing (make deps)"
    servers(lab)
    with agent(lab, tmp_path, "-b", "*", "-i", "*", "-d", "2222"), prometheus(lab, tmp_path) as base:
        outbound = 'interceptd_chain_packets_total{chain="istio-redirect"}'
        assert wait_until(lambda: bool(query(lab, base, outbound)), timeout=15, step=0.2)
        for _ in range(3):  # connections spread over a few scrapes, so rate() has points to work with
            connect_each(lab, N)
            time.sleep(1.2)
        assert wait_until(lambda: float(query(lab, base, outbound)[0]["value"][1]) == 3 * N,  # type: ignore[index]
                          timeout=10, step=0.2)
        exprs = dashboard_exprs()
        rate = next(e for e in exprs if 'chain="istio-redirect"' in e and "rate(" in e)
        inbound = next(e for e in exprs if 'chain="istio-in-redirect"' in e and "rate(" in e)
        for expr in (rate, inbound):
            values = [float(r["value"][1]) for r in query(lab, base, promql(expr))]  # type: ignore[index]
            assert len(values) == 1 and values[0] > 0, f"{expr}: {values}"
        # Every dashboard query is valid PromQL to this Prometheus, and every metric it names is scraped.
        text = scrape_text(lab)
        scraped = {name for name, _labels in parse(text)} | set(re.findall(r"^# TYPE (\S+)", text, re.M))
        names = set()
        for expr in exprs:
            if expr.startswith("label_values("):  # Grafana's function: its first argument is a metric
                expr = expr.removeprefix("label_values(").split(",")[0]
            query(lab, base, promql(expr))
            found = metric_names(expr)
            assert found, f"no metric name found in {expr!r}"
            names |= found
        assert names - scraped == set()
        assert {"interceptd_rule_packets_total", "interceptd_drift_repairs_total"} <= names


FLOOD = 2000


def _hold_idle(port: int, n: int, ready_fd: int) -> None:
    """In a forked child inside the pod: up to n connections that send the start of a request and nothing
    more (an attacker takes what it can get: after 20 failed connects, a server that stopped accepting
    ends the attempt)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, failed = [], 0
    while len(held) < n and failed < 20:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            failed += 1
            continue
        with contextlib.suppress(OSError):  # the server already made room for a newer one: hold it all the same
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
        held.append(s)
    os.write(ready_fd, f"{len(held)}\n".encode())
    signal.pause()


@contextmanager
def idle_clients(lab: Lab, n: int, port: int = 15321) -> Iterator[int]:
    """Up to n idle connections to the agent's metrics port from the pod namespace, held until the block
    ends; yields how many connected."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            enter(lab.pod)
            _hold_idle(port, n, wfd)
        finally:
            os._exit(1)
    os.close(wfd)
    report = os.fdopen(rfd)
    try:
        connected = report.readline()
        assert connected, "the idle clients did not start"
        yield int(connected)
    finally:
        report.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def table_present(lab: Lab) -> bool:
    return subprocess.run(["ip", "netns", "exec", lab.pod, "nft", "list", "table", "inet", "interceptd"],
                          capture_output=True).returncode == 0


def descriptors(pid: int) -> list[int]:
    return [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]


@pytest.mark.parametrize("hard", [4096, 1024])
def test_idle_connections_cannot_stop_the_repairs(lab: Lab, tmp_path: Path, hard: int) -> None:
    """2,000 idle clients against an agent started with systemd's soft limit of 1024 descriptors: the
    server holds a bounded number, above 1023 when the hard limit leaves room there, libnftables keeps its
    low descriptors, the repair works."""
    with agent(lab, tmp_path, "-b", "*", wrapper=("prlimit", f"--nofile=1024:{hard}")) as proc, \
            idle_clients(lab, FLOOD) as connected:
        assert connected == FLOOD  # the server took every connection (and closed the oldest idle ones)
        before = scrape(lab)
        nft(lab, "delete", "table", "inet", "interceptd")
        assert wait_until(lambda: table_present(lab), timeout=1.0), (tmp_path / "agent.log").read_text()[-2000:]
        assert proc.poll() is None
        after = wait_for(lab, REPAIRS, before.get(REPAIRS, 0))  # /metrics answers with the flood still held
        assert after[("interceptd_ready", ())] == 1
        high = [fd for fd in descriptors(proc.pid) if fd >= 1024]
        if hard > 1024:
            # At most: 64 clients, the listener and the server's wake-up pipe (3), the loop's wake-up pipe (2),
            # the kernel event sockets and their epoll (3), the table's claim (1). All long-lived: all above 1023.
            assert 0 < len(high) <= 64 + 3 + 2 + 3 + 1
        else:
            assert high == []  # no room up there: the bound alone leaves libnftables its descriptors
        assert len(descriptors(proc.pid)) < 200
    log = (tmp_path / "agent.log").read_text()
    assert "Too many open files" not in log and "FD_SETSIZE" not in log


def _abort_scrapes(port: int, n: int) -> None:
    """Scrapes that go away with a reset in the middle of their request, as a timed-out client does.

    The server reads ready connections in the order they became ready: once /healthz, asked after the
    half request was sent, has been answered, the server holds that half request and sees the reset.
    """
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            assert _raw(port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # gone with a reset


def test_aborted_scrapes_are_one_json_line_each_and_head_works(lab: Lab, tmp_path: Path) -> None:
    aborted = 200
    with agent(lab, tmp_path, "-b", "*"):
        call_in(lab.pod, _abort_scrapes, 15321, aborted)
        assert scrape(lab)[("interceptd_ready", ())] == 1
        for path in ("/metrics", "/healthz", "/readyz"):
            get, head = (call_in(lab.pod, _raw, 15321, f"{method} {path} HTTP/1.1\r\n\r\n".encode())
                         for method in ("GET", "HEAD"))
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
            assert get.startswith(head.split(b"Content-Type")[0]) and len(get) > len(head)
    lines = (tmp_path / "agent.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON: no traceback
    gone = [e for e in events if e["event"] == "http-client-aborted"]
    assert len(gone) == aborted, [e for e in events if e["event"].startswith("http")][:5]


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data
