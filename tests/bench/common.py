"""Shared by the benchmarks: the benchmark configs, timing statistics, the result table and JSON file.

Excluded CIDRs come from 198.18.0.0/15 (RFC 2544, reserved for benchmarks), as non-adjacent /30s so no
implementation can merge them; no traffic is ever sent to them. Excluded ports are Istio's 15090, 15021,
15020 plus every other port from 20000, again non-adjacent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent.parent

from support.netlab import VENV_BIN  # noqa: E402

from interceptd.config import Config, load  # noqa: E402

T = TypeVar("T")
RESULTS_DIR = ROOT / "bench-results"
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
MAX_CIDRS = BENCH_NET.num_addresses // 8
ISTIO_EXCLUDED_PORTS = (15090, 15021, 15020)


def bench_cidrs(n: int) -> list[str]:
    if n > MAX_CIDRS:
        raise ValueError(f"at most {MAX_CIDRS} benchmark CIDRs")
    base = int(BENCH_NET.network_address)
    return [f"{ipaddress.IPv4Address(base + 8 * i)}/30" for i in range(n)]


def bench_ports(n: int) -> list[int]:
    head = list(ISTIO_EXCLUDED_PORTS[:n])
    return head + [20000 + 2 * i for i in range(n - len(head))]


def bench_settings(n_cidrs: int, n_ports: int) -> dict[str, object]:
    """The seed command line (docs/istio-compatibility.md) with n excluded CIDRs (-x) and n inbound ports (-d)."""
    return {"envoy_port": 15001, "inbound_capture_port": 15006, "proxy_uid": "1337",
            "inbound_interception_mode": "REDIRECT", "service_cidr": "*", "inbound_ports": "*",
            "service_exclude_cidr": bench_cidrs(n_cidrs), "local_exclude_ports": bench_ports(n_ports)}


def bench_config(n_cidrs: int, n_ports: int) -> Config:
    return load({}, {}, bench_settings(n_cidrs, n_ports), "bench")


def toml_text(settings: dict[str, object]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def interleaved(contenders: dict[str, Callable[[], T]], reps: int) -> dict[str, list[T]]:
    """Run A B C A B C ... `reps` times after one discarded warm-up round; each callable measures itself."""
    for fn in contenders.values():
        fn()
    out: dict[str, list[T]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            out[name].append(fn())
    return out


def with_retries(fn: Callable[[], T], what: str, attempts: int = 3, pause: float = 2.0) -> T:
    """Retry a step that failed for a reason outside the benchmark (e.g. a parallel `make` re-creating .venv,
    which briefly hides Debian's nftables binding); the last failure propagates."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (RuntimeError, AssertionError) as exc:
            if attempt == attempts:
                raise
            print(f"note: {what} failed ({str(exc)[:200]}); retrying", flush=True)
            time.sleep(pause)
    raise AssertionError("unreachable")


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def summary(samples: Iterable[float]) -> dict[str, Any]:
    values = sorted(samples)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values),
            "samples": values}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Report:
    """Rows for the printed table plus everything measured, written as one JSON file."""

    sections: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def row(self, section: str, *cells: str) -> None:
        self.sections.setdefault(section, []).append(cells)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)

    def render(self) -> str:
        parts: list[str] = []
        for title, rows in self.sections.items():
            widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
            parts.append(f"\n== {title}")
            for r in rows:
                parts.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                       strict=False))))
        if self.notes:
            parts.append("\nnotes:")
            parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def write(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
        meta = {"cpus": os.cpu_count(), "kernel": os.uname().release, "time": time.strftime("%FT%T%z"),
                "interceptd_bin": str(VENV_BIN)}  # the copy whose processes were timed
        path.write_text(json.dumps({"meta": meta, "notes": self.notes, **self.data}, indent=1, default=str))
        return path


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"
