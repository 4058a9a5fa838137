"""The console scripts: each turns off Python's cyclic garbage collector before it imports the command it runs,
unless that command is an agent.

A one-shot process (`istio-iptables` in an init container, `interceptd apply`, a CNI ADD) lives for tens of
milliseconds, and reference counting alone frees what it allocates; the collector's passes over the objects
its imports and its ruleset create cost it about 2 ms at the seed's flags and 5 ms at 10,000 excluded CIDRs,
for no memory back. The agents (`run`, `node`) live for months and keep the collector. In-process callers
(the tests, the benchmark driver) import cli.main and cli.cni themselves and keep it too.
"""

from __future__ import annotations

import gc
import sys

AGENT_COMMANDS = ("run", "node")


def interceptd() -> None:
    """`interceptd COMMAND ...`."""
    if sys.argv[1:2] not in ([command] for command in AGENT_COMMANDS):
        gc.disable()
    from interceptd.cli.main import main

    main()


def istio_iptables() -> None:
    """`istio-iptables ARGS`: always one-shot."""
    gc.disable()
    from interceptd.cli.main import istio_iptables_main

    istio_iptables_main()


def interceptd_cni() -> None:
    """`interceptd-cni`, run by the container runtime for each pod: always one-shot."""
    gc.disable()
    from interceptd.cli.cni import main

    main()
