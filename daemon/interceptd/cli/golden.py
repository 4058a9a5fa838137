"""Golden renders: one nft text file per configuration, so a review sees every changed rule as a diff.

Why: the unit tests check rule names and chosen decisions, but a rule can keep its name while its expression
changes (a port, a negation, a set). tests/golden/NAME.nft holds `interceptd render --format nft` for one
configuration on a fixed host, byte for byte; a test renders again and compares. `make golden` (that is,
`python -m interceptd.cli.golden write ROOT`) rewrites the files after a deliberate change.

Inputs, per NAME under tests/golden: NAME.args (the `interceptd render` arguments, shell syntax) and/or
NAME.toml (passed as --config). Every config/examples/X.toml is rendered too, as example-X.nft, from the
example itself (a copy would drift from it). The environment is not read: a golden never depends on who
runs it. The host is fixed: interface addresses 192.0.2.2 then 2001:db8::2 (so IPv6 is on only with
--dual-stack or --ipv6 on, as on a real dual-stack pod) and resolv.conf servers 192.0.2.53 and 2001:db8::53.

A name starting with `host-probe` is the node's host probe table (`interceptd node --ambient-host-rules`)
for the configuration, with a fixed set of ambient pods (HOST_PROBE_PODS) instead of a pod's table.
"""

from __future__ import annotations

import ipaddress
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from interceptd.cli import commands, docs
from interceptd.cli import main as cli
from interceptd.ruleset.hostprobe import render_host
from interceptd.system import host

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from interceptd.ruleset.facts import IPAddress

GOLDEN_DIR = "tests/golden"
EXAMPLES_DIR = "config/examples"
EXAMPLE_PREFIX = "example-"
HOST_ADDRESSES = ["192.0.2.2", "2001:db8::2"]
HOST_RESOLV_CONF = "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"
HOST_PROBE_PREFIX = "host-probe"
HOST_PROBE_PODS: list[IPAddress] = [ipaddress.ip_address(a) for a in ("192.0.2.11", "192.0.2.10", "2001:db8::10")]


def cases(root: Path) -> dict[str, list[str]]:
    """Golden name -> `render` arguments, for every input under tests/golden and every example."""
    golden = root / GOLDEN_DIR
    out: dict[str, list[str]] = {}
    for path in sorted(golden.glob("*.args")) + sorted(golden.glob("*.toml")):
        out.setdefault(path.stem, [])
    for name, argv in out.items():
        toml, args = golden / f"{name}.toml", golden / f"{name}.args"
        if toml.exists():
            argv += ["--config", str(toml)]
        if args.exists():
            argv += shlex.split(args.read_text(encoding="utf-8"), comments=True)
    for example in sorted((root / EXAMPLES_DIR).glob("*.toml")):
        out[EXAMPLE_PREFIX + example.stem] = ["--config", str(example)]
    return dict(sorted(out.items()))


def render_case(argv: Sequence[str], fmt: str = "nft", name: str = "") -> str:
    """`interceptd render --format FMT ARGV` on the fixed host, without the environment (for a host probe
    golden `name`: the host probe table of that configuration, as nft text)."""
    args, config = cli.parse(["render", "--format", fmt, *argv], env={})
    if name.startswith(HOST_PROBE_PREFIX):
        return commands.printed(render_host(config, HOST_PROBE_PODS), fmt)
    facts = host.detect(config, HOST_ADDRESSES, HOST_RESOLV_CONF, commands.IPV6_CHOICE[args.ipv6])
    return commands.rendered(config, facts, args.format)


def golden_path(root: Path, name: str) -> Path:
    return root / GOLDEN_DIR / f"{name}.nft"


def write(root: Path) -> list[str]:
    """Regenerate every golden under `root`, and remove the ones whose input is gone; returns what changed."""
    changed = []
    wanted = cases(root)
    for name, argv in wanted.items():
        path = golden_path(root, name)
        if docs.update(path, render_case(argv, name=name)):
            changed.append(f"regenerated {path}")
    for path in sorted((root / GOLDEN_DIR).glob("*.nft")):
        if path.stem not in wanted:
            path.unlink()
            changed.append(f"removed {path} (no NAME.args or NAME.toml input)")
    return changed


def main(argv: Sequence[str]) -> int:
    return docs.write_main(argv, "interceptd.cli.golden", write)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
