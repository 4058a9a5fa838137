"""Apply time: interceptd against the one-rule-per-entry rulesets it replaces, in a throw-away namespace.

Contenders, for each list size, fresh (empty namespace) and as a full re-apply over the loaded ruleset:
- `interceptd apply --config FILE` (the init-container path, Python start-up included);
- interceptd in process: install.apply with one long-lived NftKernel, as `apply` does it (no read-back);
- the agent's apply: the same plus the read-back that becomes its drift reference;
- a bare libnftables json_cmd of the very JSON install.apply sends (the floor for interceptd);
- what-if: the same ruleset in nft's text syntax through libnftables (what JSON parsing costs);
- `nft -j -f` and `nft -f` of Istio's nftables layout; `iptables-nft-restore` of its iptables layout.
Resetting and pre-loading the namespace between samples is never timed.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import istio_layout
from common import (
    Report,
    bench_config,
    bench_settings,
    interleaved,
    ms,
    ratio,
    summary,
    timed,
    toml_text,
    with_retries,
)
from support.netlab import INTERCEPTD, Lab, call_in

from interceptd.control import install
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.render import render
from interceptd.system.kernel import NftKernel
from interceptd.system.routes import Netlink

TEXT_WHATIF = "what-if: as nft text"
AGENT = "agent apply (+read-back)"
CONTENDERS = ("interceptd apply (CLI)", "interceptd in-process", AGENT, "bare json_cmd", TEXT_WHATIF,
              "istio nft -j -f", "istio nft -f", "istio iptables-restore")
FACTS = HostFacts(ipv6=False, host_ip=None)


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({result.returncode}): {result.stderr.strip()[:300]}")


class Bench:
    """Runs inside the benchmark namespace (a forked child of the driver)."""

    def __init__(self, workdir: Path, sizes: tuple[int, ...], n_ports: int) -> None:
        import nftables

        self.kernel = NftKernel()
        self.bare = nftables.Nftables()
        self.text = nftables.Nftables()  # text in and out
        self.work = workdir
        self.sizes = sizes
        self.n_ports = n_ports
        self.inproc: Callable[[], Callable[[], None]] = lambda: lambda: None

    def reset(self) -> None:
        rc, _, err = self.bare.cmd("flush ruleset")  # our own throw-away namespace, nothing else in it
        if rc != 0:
            raise RuntimeError(err)

    def files(self, n: int) -> dict[str, str]:
        config = bench_config(n, self.n_ports)
        paths = {"toml": self.work / f"bench-{n}.toml", "nft": self.work / f"istio-{n}.nft",
                 "json": self.work / f"istio-{n}.json", "ipt": self.work / f"istio-{n}.ipt"}
        paths["toml"].write_text(toml_text(bench_settings(n, self.n_ports)))
        paths["nft"].write_text(istio_layout.nft_text(config))
        paths["json"].write_text(json.dumps(istio_layout.nft_json(config)))
        paths["ipt"].write_text(istio_layout.iptables_restore(config))
        return {k: str(v) for k, v in paths.items()}

    def contenders(self, n: int) -> dict[str, Callable[[], Callable[[], None]]]:
        """name -> prepare(); prepare runs untimed and returns the action to time."""
        f = self.files(n)
        ruleset = render(bench_config(n, self.n_ports), FACTS)

        def bare() -> Callable[[], None]:
            # Exactly the document install.apply would send now, built before the clock starts.
            current = self.kernel.list_table(ruleset.table)
            doc = transaction(ruleset, Existing.empty() if current is None else Existing.from_listing(current))

            def json_cmd() -> None:
                rc, _, err = self.bare.json_cmd(doc)
                if rc != 0:
                    raise RuntimeError(err)
            return json_cmd

        def same(action: Callable[[], object]) -> Callable[[], Callable[[], None]]:
            def go() -> None:
                action()
            return lambda: go

        def as_text() -> Callable[[], None]:
            text = whatif_text

            def cmd() -> None:
                rc, _, err = self.text.cmd(text)
                if rc != 0:
                    raise RuntimeError(err)
            return cmd

        whatif_text = self.text_form(ruleset)
        return {
            "interceptd apply (CLI)": same(lambda: _run(INTERCEPTD, "apply", "--config", f["toml"])),
            # What `interceptd apply` does in-process, and what the agent does (plus the drift reference).
            "interceptd in-process": same(lambda: install.apply(self.kernel, Netlink(), ruleset, reference=False)),
            AGENT: same(lambda: install.apply(self.kernel, Netlink(), ruleset)),
            "bare json_cmd": bare,
            TEXT_WHATIF: as_text,
            "istio nft -j -f": same(lambda: _run("nft", "-j", "-f", f["json"])),
            "istio nft -f": same(lambda: _run("nft", "-f", f["nft"])),
            "istio iptables-restore": same(lambda: _run("iptables-nft-restore", f["ipt"])),
        }

    def text_form(self, ruleset: Ruleset) -> str:
        """interceptd's own ruleset in nft's text syntax, as the kernel lists it after an apply: how fast
        libnftables takes the same transaction when it does not have to parse JSON."""
        self.reset()
        install.apply(self.kernel, Netlink(), ruleset)
        rc, listing, err = self.text.cmd(f"list table inet {ruleset.table}")
        self.reset()
        if rc != 0:
            raise RuntimeError(err)
        listing = re.sub(r"counter packets \d+ bytes \d+", "counter", listing)
        return f"add table inet {ruleset.table}\nflush table inet {ruleset.table}\n{listing}"

    def sample(self, name: str, prepare: Callable[[], Callable[[], None]], loaded: bool) -> float:
        return with_retries(lambda: self._sample(name, prepare, loaded), name)

    def _sample(self, name: str, prepare: Callable[[], Callable[[], None]], loaded: bool) -> float:
        self.reset()
        if loaded:
            # The same ruleset already in place (bare json_cmd re-applies over interceptd's own table).
            (self.inproc if name == "bare json_cmd" else prepare)()()
        return timed(prepare())

    def run(self, reps: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in self.sizes:
            fns = self.contenders(n)
            self.inproc = fns["interceptd in-process"]  # how sample() pre-loads for the bare json_cmd
            render_s = [timed(lambda n=n: render(bench_config(n, self.n_ports), FACTS)) for _ in range(reps)]
            for mode, loaded in (("fresh", False), ("reapply", True)):
                samples = interleaved({name: (lambda name=name, fn=fn, loaded=loaded: self.sample(name, fn, loaded))
                                       for name, fn in fns.items()}, reps)
                out[f"{n}/{mode}"] = {name: summary(s) for name, s in samples.items()}
            out[f"{n}/render"] = summary(render_s)
            self.reset()
        return out


def _in_ns(workdir: str, sizes: tuple[int, ...], n_ports: int, reps: int) -> dict[str, Any]:
    return Bench(Path(workdir), sizes, n_ports).run(reps)


def run(report: Report, sizes: tuple[int, ...], n_ports: int, reps: int) -> None:
    # The lab's pod namespace has the interface address `interceptd apply` needs (host facts).
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="icd-bench-") as workdir:
        results: dict[str, Any] = call_in(lab.pod, _in_ns, workdir, sizes, n_ports, reps)
    report.data["apply"] = {"excluded_ports": n_ports, "reps": reps, "results": results}
    title = f"apply: median of {reps} (interleaved), {n_ports} excluded inbound ports; ratio = istio nft -f / x"
    report.row(title, "CIDRs/mode", *CONTENDERS, "nft-f/CLI", "nft-f/in-proc", "in-proc/bare", "nft-f/text")
    for n in sizes:
        for mode in ("fresh", "reapply"):
            med = {name: results[f"{n}/{mode}"][name]["median"] for name in CONTENDERS}
            report.row(title, f"{n} {mode}", *(ms(med[name]) for name in CONTENDERS),
                       ratio(med["istio nft -f"], med["interceptd apply (CLI)"]),
                       ratio(med["istio nft -f"], med["interceptd in-process"]),
                       ratio(med["interceptd in-process"], med["bare json_cmd"]),
                       ratio(med["istio nft -f"], med[TEXT_WHATIF]))
    report.row(title, "render (pure)", *(ms(results[f"{n}/render"]["median"]) + f" @{n}" for n in sizes))
