"""Apply time, as users run it: whole processes, each trial in a fresh network namespace, interleaved.

An init container runs `istio-iptables ...` once per pod start, and a CNI plugin runs once per pod ADD: the
whole process is what counts, interpreter start-up and imports included. Contenders, for each list size
(N excluded CIDRs, 1,000 excluded inbound ports; 3 at N=10), fresh (empty namespace) and as a full
re-apply over the same ruleset already loaded:
- the Python floor: `/usr/bin/python3 -c 'import nftables; nftables.Nftables()'`;
- `interceptd apply --config FILE`, the headline row;
- `istio-iptables` with the seed's flags (`-x` and `-d` carrying the N CIDRs and the ports; at 10,000 the
  list is longer than Linux takes in one argument, so those two lists come in a TOML file, `--config`);
- interceptd in process: the CLI's `apply` (parse, host facts, render, version check, one transaction)
  without interpreter start-up and imports; the agent's apply adds the read-back of its drift reference;
- a bare libnftables json_cmd of the very JSON `apply` sends (the floor for the transaction itself);
- what-if: the same ruleset in nft's text syntax through libnftables (what JSON parsing costs);
- `nft -j -f` and `nft -f` of Istio's nftables layout; `iptables-nft-restore` of its iptables layout.
Creating the namespace, pre-loading it and building inputs are never timed. The commands are those of the
installed copy `make bench` builds (support.netlab.VENV_BIN: a regular install laid out as the image's), the
in-process rows run in the development venv that drives the benchmark.

`interceptd-cni` ADD: Debian's bridge + host-local, then interceptd-cni, for one fresh pod namespace,
beside the bridge plugin alone (CNI's own chain, as a runtime runs it), interleaved.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import istio_layout
import nftables
from common import (
    Report,
    bench_cidrs,
    bench_config,
    bench_ports,
    bench_settings,
    interleaved,
    ms,
    ratio,
    summary,
    timed,
    toml_text,
    with_retries,
)
from support.netlab import INTERCEPTD, VENV_BIN, call_in, delete_ns, new_ns, sh
from support.nodelab import CniNode

from interceptd.cli.main import run_command
from interceptd.config import Config
from interceptd.control import install
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.render import render
from interceptd.system import host
from interceptd.system.kernel import NftKernel
from interceptd.system.routes import Netlink

FLOOR = "python floor"
CLI = "interceptd apply (CLI)"
ALIAS = "istio-iptables (CLI)"
INPROC = "interceptd in-process"
AGENT = "agent apply (+read-back)"
BARE = "bare json_cmd"
TEXT_WHATIF = "what-if: as nft text"
NFT_J, NFT, IPT = "istio nft -j -f", "istio nft -f", "istio iptables-restore"
CONTENDERS = (FLOOR, CLI, ALIAS, INPROC, AGENT, BARE, TEXT_WHATIF, NFT_J, NFT, IPT)
FLOOR_CMD = ("/usr/bin/python3", "-c", "import nftables; nftables.Nftables()")
ISTIO_IPTABLES = str(VENV_BIN / "istio-iptables")
CNI_CHAIN, CNI_BRIDGE = "bridge + interceptd-cni", "bridge alone"
POD_IP = "192.0.2.2"
# Imported here, so the in-process row (run in a forked child) counts no import: `apply` imports it lazily.
importlib.import_module("interceptd.cli.commands")


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({result.returncode}): {result.stderr.strip()[:300]}")


# Linux refuses a single argument (or environment string) over 32 pages (MAX_ARG_STRLEN): Istio's flags
# cannot carry 10,000 CIDRs either. Longer lists go to a TOML file, the rest stays on the command line.
MAX_ARG = 128 * 1024 - 1


def seed_argv(n: int, n_ports: int, workdir: Path) -> list[str]:
    """Istio's init-container flags with the N CIDRs and the ports of the benchmark config."""
    lists = {"-x": ",".join(bench_cidrs(n)), "-d": ",".join(map(str, bench_ports(n_ports)))}
    argv = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]
    if max(map(len, lists.values())) <= MAX_ARG:
        return [*argv, "-x", lists["-x"], "-d", lists["-d"]]
    toml = workdir / f"alias-{n}.toml"
    toml.write_text(toml_text({"service_exclude_cidr": bench_cidrs(n), "local_exclude_ports": bench_ports(n_ports)}))
    return [*argv, "--config", str(toml)]


@contextlib.contextmanager
def pod_namespace() -> Iterator[str]:
    """A fresh namespace with one global address (the host facts `apply` reads), deleted on exit."""
    ns = new_ns("-apply")
    try:
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", ns=ns)
        sh("ip", "addr", "add", f"{POD_IP}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        yield ns
    finally:
        delete_ns(ns)


def in_process_apply(toml: str) -> None:
    """What `interceptd apply --config FILE` does after start-up, in this process (its summary line muted)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = run_command(["apply", "--config", toml])
    if code != 0:
        raise RuntimeError(f"in-process apply failed ({code}): {err.getvalue().strip()[:300]}")


def agent_apply(config: Config) -> None:
    """The agent's apply: render from fresh host facts, install, read back the drift reference."""
    install.apply(NftKernel(), Netlink(), render(config, host.detect(config)))


class Inputs:
    """Everything one list size needs, built once in the driver: files, argv, the ruleset, its text form."""

    def __init__(self, workdir: Path, n: int, n_ports: int) -> None:
        config = bench_config(n, n_ports)
        self.n = n
        self.files = {"toml": workdir / f"bench-{n}.toml", "nft": workdir / f"istio-{n}.nft",
                      "json": workdir / f"istio-{n}.json", "ipt": workdir / f"istio-{n}.ipt"}
        self.files["toml"].write_text(toml_text(bench_settings(n, n_ports)))
        self.files["nft"].write_text(istio_layout.nft_text(config))
        self.files["json"].write_text(json.dumps(istio_layout.nft_json(config)))
        self.files["ipt"].write_text(istio_layout.iptables_restore(config))
        self.alias = seed_argv(n, n_ports, workdir)
        self.config = config
        with pod_namespace() as ns:
            self.text = call_in(ns, text_form, config, timeout=300)

    def path(self, key: str) -> str:
        return str(self.files[key])


def text_form(config: Config) -> str:
    """interceptd's own ruleset in nft's text syntax, as the kernel lists it after an apply: how fast
    libnftables takes the same transaction when it does not have to parse JSON (run in a scratch namespace)."""
    ruleset = render(config, host.detect(config))
    install.apply(NftKernel(), Netlink(), ruleset)
    nft = nftables.Nftables()
    rc, listing, err = nft.cmd(f"list table inet {ruleset.table}")
    if rc != 0:
        raise RuntimeError(err)
    listing = re.sub(r"counter packets \d+ bytes \d+", "counter", listing)
    return f"add table inet {ruleset.table}\nflush table inet {ruleset.table}\n{listing}"


def _libnftables(document: str, is_json: bool) -> Callable[[], None]:
    nft = nftables.Nftables()
    nft.set_json_output(is_json)  # libnftables 1.0.6 parses its input as JSON only in JSON output mode

    def cmd() -> None:
        rc, _, err = nft.cmd(document)
        if rc != 0:
            raise RuntimeError(err)
    return cmd


def prepare(name: str, inputs: Inputs) -> Callable[[], None]:
    """Untimed set-up inside the trial's namespace; returns the action to time."""
    if name == FLOOR:
        return lambda: _run(*FLOOR_CMD)
    if name == CLI:
        return lambda: _run(INTERCEPTD, "apply", "--config", inputs.path("toml"))
    if name == ALIAS:
        return lambda: _run(ISTIO_IPTABLES, *inputs.alias)
    if name == INPROC:
        return lambda: in_process_apply(inputs.path("toml"))
    if name == AGENT:
        return lambda: agent_apply(inputs.config)
    if name == BARE:
        # Exactly the document `apply` would send now, built before the clock starts.
        ruleset: Ruleset = render(inputs.config, HostFacts(ipv6=False, host_ip=None))
        current = NftKernel().list_table(ruleset.table)
        doc = transaction(ruleset, Existing.empty() if current is None else Existing.from_listing(current))
        return _libnftables(json.dumps(doc), True)
    if name == TEXT_WHATIF:
        return _libnftables(inputs.text, False)
    if name == NFT_J:
        return lambda: _run("nft", "-j", "-f", inputs.path("json"))
    if name == NFT:
        return lambda: _run("nft", "-f", inputs.path("nft"))
    if name == IPT:
        return lambda: _run("iptables-nft-restore", inputs.path("ipt"))
    raise ValueError(name)


def _cpu_s() -> float:
    """User + system CPU of this process and of its children that ended (a subprocess contender)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _trial(name: str, inputs: Inputs, loaded: bool) -> tuple[float, float]:
    """One sample, in a forked child inside its own fresh namespace: wall-clock and CPU seconds. The CPU
    time (the kernel's work on the transaction included, as system time) is what stays comparable when
    other work shares the machine's cores."""
    if loaded and name in (BARE, FLOOR):
        in_process_apply(inputs.path("toml"))  # the bare json_cmd re-applies over interceptd's own table
    elif loaded:
        prepare(name, inputs)()  # the same ruleset already in place
    action = prepare(name, inputs)
    cpu = _cpu_s()
    wall = timed(action)
    return wall, _cpu_s() - cpu


def sample(name: str, inputs: Inputs, loaded: bool) -> tuple[float, float]:
    def once() -> tuple[float, float]:
        with pod_namespace() as ns:
            wall, cpu = call_in(ns, _trial, name, inputs, loaded, timeout=300)
            return float(wall), float(cpu)
    return with_retries(once, name)


def _measure_size(inputs: Inputs, reps: int) -> dict[str, Any]:
    facts = HostFacts(ipv6=False, host_ip=None)
    out = {f"{inputs.n}/render": summary(timed(lambda: render(inputs.config, facts)) for _ in range(reps))}
    for mode, loaded in (("fresh", False), ("reapply", True)):
        samples = interleaved({name: (lambda name=name, loaded=loaded: sample(name, inputs, loaded))
                               for name in CONTENDERS}, reps)
        out[f"{inputs.n}/{mode}"] = {name: summary(wall for wall, _ in s) for name, s in samples.items()}
        out[f"{inputs.n}/{mode}/cpu"] = {name: summary(cpu for _, cpu in s) for name, s in samples.items()}
    return out


def measure_apply(sizes: tuple[int, ...], n_ports: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="icd-bench-") as workdir:
        for n in sizes:
            out.update(_measure_size(Inputs(Path(workdir), n, n_ports if n > 10 else 3), reps))
    return out


def measure_cni(reps: int) -> dict[str, Any]:
    """ADD of one pod: the bridge plugin alone, and the chain with interceptd-cni; DEL (untimed) after each."""
    with CniNode() as node:
        plugins = node.plugins()
        counter = itertools.count()

        def add(chain: bool) -> Callable[[], tuple[float, float]]:
            def go() -> tuple[float, float]:
                pod, container = new_ns("-pod"), f"bench-{next(counter)}"
                netns = f"/run/netns/{pod}"
                try:
                    cpu, started = _cpu_s(), time.perf_counter()
                    done = [node.exec(plugins[0], "ADD", netns, container)]
                    if chain and done[0].rc == 0:
                        done.append(node.exec(plugins[1], "ADD", netns, container, prev=done[0].out))
                    elapsed, cpu = time.perf_counter() - started, _cpu_s() - cpu
                    for result in done:
                        if result.rc != 0:
                            raise RuntimeError(f"CNI ADD failed ({result.rc}): {result.stderr.strip()[:300]}")
                    return elapsed, cpu
                finally:
                    node.chain("DEL", pod, container)
                    delete_ns(pod)
            return go

        samples = interleaved({CNI_BRIDGE: add(False), CNI_CHAIN: add(True)}, reps)
    return {**{name: summary(wall for wall, _ in s) for name, s in samples.items()},
            **{f"{name}/cpu": summary(cpu for _, cpu in s) for name, s in samples.items()}}


def run(report: Report, sizes: tuple[int, ...], n_ports: int, reps: int, cni_reps: int = 20) -> None:
    results = measure_apply(sizes, n_ports, reps)
    cni = measure_cni(cni_reps)
    report.data["apply"] = {"excluded_ports": n_ports, "reps": reps, "results": results, "cni": cni}
    for kind, suffix in (("wall-clock", ""), ("CPU (user + system, children included)", "/cpu")):
        title = (f"apply, {kind}: whole processes, median of {reps} (interleaved, each trial in a fresh "
                 f"namespace), N excluded CIDRs + {n_ports} excluded inbound ports (3 at N=10)")
        report.row(title, "CIDRs/mode", *CONTENDERS, "CLI/floor", "alias/floor", "CLI/nft-f", "alias/nft-f",
                   "in-proc/bare")
        for n in sizes:
            for mode in ("fresh", "reapply"):
                med = {name: results[f"{n}/{mode}{suffix}"][name]["median"] for name in CONTENDERS}
                report.row(title, f"{n} {mode}", *(ms(med[name]) for name in CONTENDERS),
                           ratio(med[CLI], med[FLOOR]), ratio(med[ALIAS], med[FLOOR]),
                           ratio(med[CLI], med[NFT]), ratio(med[ALIAS], med[NFT]), ratio(med[INPROC], med[BARE]))
    report.row(title, "render (pure)", *(ms(results[f"{n}/render"]["median"]) + f" @{n}" for n in sizes))
    cni_title = (f"interceptd-cni ADD: one pod, median of {cni_reps} (interleaved, each in a fresh pod namespace), "
                 "plugins run as CniNode runs them (ip netns exec in the node namespace)")
    report.row(cni_title, "chain", "median", "min", "max", "vs bridge alone", "CPU median", "CPU vs bridge alone")
    for name in (CNI_BRIDGE, CNI_CHAIN):
        wall, cpu = cni[name], cni[f"{name}/cpu"]
        more = [ms(wall["median"] - cni[CNI_BRIDGE]["median"]), ms(cpu["median"]),
                ms(cpu["median"] - cni[f"{CNI_BRIDGE}/cpu"]["median"])]
        report.row(cni_title, name, ms(wall["median"]), ms(wall["min"]), ms(wall["max"]),
                   *(more if name == CNI_CHAIN else ["", more[1], ""]))
