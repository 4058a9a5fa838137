"""Datapath: new TCP connections per second through the redirect, with growing exclusion lists.

Outbound: a client in the pod connects to 198.51.100.1:8080 (routed to the peer, not excluded); the rules
redirect it to the pod's listener on 15001. Inbound: a client in the peer connects to 192.0.2.2:8080; the
rules redirect it to the pod's listener on 15006. The listener checks SO_ORIGINAL_DST of every connection.
N exclusions = N excluded CIDRs (-x, walked by every outbound connection in a linear layout) and N excluded
inbound ports (-d, walked by every inbound connection). Baselines: no rules at all (the connection goes to
a listener on the real destination) and one redirect rule per direction.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import istio_layout
from common import (
    BENCH_DIR,
    Report,
    bench_config,
    bench_settings,
    percentile,
    ratio,
    toml_text,
    with_retries,
)
from support.netlab import Lab, sh

OUT_DST = ("198.51.100.1", 8080)
IN_PORT = 8080
SINGLE_RULE = """table inet bench-single {
  chain output { type nat hook output priority -100; policy accept; meta l4proto tcp redirect to :15001; }
  chain prerouting { type nat hook prerouting priority -100; policy accept; meta l4proto tcp redirect to :15006; }
}
"""
# Conntrack entries of RST-closed connections linger 10 s by default; the run makes hundreds of thousands.
NS_SYSCTLS = {"net.netfilter.nf_conntrack_tcp_timeout_close": "1",
              "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "1",
              "net.ipv4.ip_local_port_range": "1024 65000", "net.core.somaxconn": "8192"}


def build_connbench(workdir: Path) -> str:
    binary = workdir / "connbench"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(binary),
                    str(BENCH_DIR / "connbench.c")], check=True)
    return str(binary)


def _nsexec(ns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def _fields(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in line.split())}


class Datapath:
    def __init__(self, lab: Lab, binary: str, workdir: Path, threads: int, listener_threads: int,
                 seconds: float) -> None:
        self.lab, self.bin, self.work = lab, binary, workdir
        self.threads, self.listener_threads, self.seconds = threads, listener_threads, seconds

    def tune(self) -> None:
        """Per-namespace sysctls, after conntrack is in use (its sysctls appear with the module)."""
        for ns in (self.lab.pod, self.lab.peer):
            for key, value in NS_SYSCTLS.items():
                sh("sysctl", "-q", "-w", f"{key}={value}", ns=ns)

    # -- rules -------------------------------------------------------------------------------------
    def reset(self) -> None:
        sh("nft", "flush ruleset", ns=self.lab.pod)  # the pod namespace is the bench's own

    def installers(self, sizes: tuple[int, ...]) -> dict[str, Callable[[], None]]:
        out: dict[str, Callable[[], None]] = {"no rules": lambda: None,
                                               "single rule": lambda: self._load("single.nft", SINGLE_RULE, "nft")}
        for n in sizes:
            config = bench_config(n, n)
            toml = self.work / f"dp-{n}.toml"
            toml.write_text(toml_text(bench_settings(n, n)))
            out[f"interceptd {n}"] = lambda toml=toml: self.lab.interceptd("apply", "--config", str(toml)) and None
            out[f"istio nft {n}"] = (lambda n=n, config=config:
                                     self._load(f"dp-istio-{n}.nft", istio_layout.nft_text(config), "nft"))
            out[f"iptables-nft {n}"] = (lambda n=n, config=config:
                                        self._load(f"dp-istio-{n}.ipt", istio_layout.iptables_restore(config),
                                                   "iptables-nft-restore"))
        return out

    def _load(self, name: str, text: str, tool: str) -> None:
        path = self.work / name
        if not path.exists():
            path.write_text(text)
        sh(tool, *(["-f"] if tool == "nft" else []), str(path), ns=self.lab.pod)

    # -- traffic -----------------------------------------------------------------------------------
    def measure(self, direction: str, redirected: bool) -> dict[str, float]:
        lab = self.lab
        if direction == "outbound":
            client_ns, dst = lab.pod, OUT_DST
            listen_ns, listen_port = (lab.pod, 15001) if redirected else (lab.peer, OUT_DST[1])
        else:
            client_ns, dst = lab.peer, (lab.pod_ip, IN_PORT)
            listen_ns, listen_port = lab.pod, (15006 if redirected else IN_PORT)
        listener = subprocess.Popen([*_nsexec(listen_ns), self.bin, "listen", str(listen_port), dst[0],
                                     str(dst[1]), str(self.listener_threads)],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "ready":
                raise RuntimeError("connbench listener did not start")
            client = subprocess.run([*_nsexec(client_ns), self.bin, "connect", dst[0], str(dst[1]),
                                     str(self.threads), str(self.seconds)],
                                    capture_output=True, text=True, timeout=self.seconds + 30, check=True)
            listener.terminate()
            served = _fields(listener.communicate(timeout=10)[0])
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        got = _fields(client.stdout)
        return {"conn_per_s": got["ok"] / got["seconds"], "ok": got["ok"], "mismatch": got["mismatch"],
                "error": got["error"], "listener_ok": served["ok"], "listener_mismatch": served["mismatch"],
                "client_cpu_s": got["user"] + got["sys"], "client_user_s": got["user"],
                "listener_cpu_s": served["user"] + served["sys"], "listener_user_s": served["user"],
                "seconds": got["seconds"]}


def _sweep(dp: Datapath, installers: dict[str, Callable[[], None]], reps: int) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {}
    for _ in range(reps):
        for name, install in installers.items():
            dp.reset()
            with_retries(install, f"installing {name}")
            for direction in ("outbound", "inbound"):
                samples.setdefault(f"{name}/{direction}", []).append(dp.measure(direction, name != "no rules"))
    dp.reset()
    return samples


def failures(samples: dict[str, list[dict[str, float]]]) -> list[str]:
    """Every measurement where a connection failed, reached its listener with the wrong SO_ORIGINAL_DST, or
    where client and listener disagree on how many connections were served: a rate is only worth reporting
    when every connection it counts was intercepted correctly."""
    out = []
    for key, runs in samples.items():
        for n, r in enumerate(runs):
            if r["mismatch"] or r["error"] or r["listener_mismatch"] or r["listener_ok"] != r["ok"]:
                out.append(f"{key} #{n + 1}: client ok={r['ok']:.0f} mismatch={r['mismatch']:.0f} "
                           f"error={r['error']:.0f}, listener ok={r['listener_ok']:.0f} "
                           f"mismatch={r['listener_mismatch']:.0f}")
    return out


def _median_sample(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians of the rate and of the CPU cost; CPU shares are of one core, summed over the run."""
    rates = [r["conn_per_s"] for r in runs]
    # Connections per CPU-second of generator + listener (the kernel's work is charged to them as system
    # time): robust when other work shares the machine, unlike the wall-clock rate.
    per_cpu = [r["ok"] / (r["client_cpu_s"] + r["listener_cpu_s"]) for r in runs]
    wall = sum(r["seconds"] for r in runs)
    return {"conn_per_s": percentile(rates, 0.5), "samples": rates, "conn_per_cpu_s": percentile(per_cpu, 0.5),
            "per_cpu_samples": per_cpu,
            "mismatch": sum(r["mismatch"] + r["listener_mismatch"] for r in runs),
            "error": sum(r["error"] for r in runs),
            "client_cpu_share": sum(r["client_cpu_s"] for r in runs) / wall,
            "listener_cpu_share": sum(r["listener_cpu_s"] for r in runs) / wall,
            "user_share": sum(r["client_user_s"] + r["listener_user_s"] for r in runs) / wall}


def run(report: Report, sizes: tuple[int, ...], reps: int, seconds: float, threads: int,
        listener_threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="icd-bench-") as tmp, Lab() as lab:
        work = Path(tmp)
        dp = Datapath(lab, build_connbench(work), work, threads, listener_threads, seconds)
        installers = dp.installers(sizes)
        # One short discarded round warms caches and checks every contender works before timing.
        dp.seconds = min(seconds, 0.5)
        bad = failures(_sweep(dp, installers, 1))
        dp.tune()
        dp.seconds = seconds
        started = time.monotonic()
        samples = _sweep(dp, installers, reps)
        elapsed = time.monotonic() - started
    bad += failures(samples)
    results = {key: _median_sample(runs) for key, runs in samples.items()}
    report.data["datapath"] = {"reps": reps, "seconds": seconds, "client_threads": threads,
                               "listener_threads": listener_threads, "cpus": os.cpu_count(),
                               "wall_s": elapsed, "results": results}
    title = (f"datapath: new TCP connections/s, median of {reps} x {seconds:g} s (interleaved), "
             f"{threads} client / {listener_threads} listener threads; per CPU-s = per second of generator + "
             "listener CPU (kernel work included)")
    report.row(title, "rules", "out conn/s", "vs single", "out per CPU-s", "vs single", "in conn/s", "vs single",
               "in per CPU-s", "vs single", "mismatch", "errors", "gen CPU", "listener CPU", "user CPU")
    single = {d: results[f"single rule/{d}"] for d in ("outbound", "inbound")}
    for name in installers:
        cells: list[str] = []
        for d in ("outbound", "inbound"):
            r = results[f"{name}/{d}"]
            cells += [f"{r['conn_per_s']:.0f}", ratio(r["conn_per_s"], single[d]["conn_per_s"]),
                      f"{r['conn_per_cpu_s']:.0f}", ratio(r["conn_per_cpu_s"], single[d]["conn_per_cpu_s"])]
        both = [results[f"{name}/{d}"] for d in ("outbound", "inbound")]
        report.row(title, name, *cells, f"{sum(r['mismatch'] for r in both):.0f}",
                   f"{sum(r['error'] for r in both):.0f}",
                   *(f"{sum(r[k] for r in both) / 2:.0%}" for k in ("client_cpu_share", "listener_cpu_share",
                                                                    "user_share")))
    for n in sizes:
        cells = []
        for d in ("outbound", "inbound"):
            ours, theirs = results[f"interceptd {n}/{d}"], results[f"istio nft {n}/{d}"]
            cells += [ratio(ours["conn_per_s"], theirs["conn_per_s"]), "",
                      ratio(ours["conn_per_cpu_s"], theirs["conn_per_cpu_s"]), ""]
        report.row(title, f"interceptd/istio-nft {n}", *cells)
    if bad:
        # After the table, so the figures are kept; bench.py then exits non-zero.
        raise RuntimeError(f"{len(bad)} datapath measurement(s) with failed or misdirected connections: "
                           + "; ".join(bad[:5]))
