"""The subcommands: glue between config, render, the kernel and the terminal.

An init container or a CNI plugin pays for every module the process imports, so this module imports only
what the one-shot commands share; the agents' machinery (structlog, prometheus_client, asyncio, the HTTP
server) and each command's own extras are imported inside the command that uses them.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from interceptd.config import OPTIONS_BY_KEY, Config, load_all
from interceptd.control import install
from interceptd.errors import ConfigError, KernelRefusedError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Existing, deletion, transaction
from interceptd.ruleset.nfttext import ruleset_text
from interceptd.ruleset.render import render
from interceptd.system import host, preflight
from interceptd.system.kernel import Kernel, NftKernel
from interceptd.system.routes import Netlink, Router

IPV6_CHOICE = {"auto": None, "on": True, "off": False}


def facts_for(config: Config, ipv6: str = "auto") -> HostFacts:
    return host.detect(config, ipv6_override=IPV6_CHOICE[ipv6])


def rendered(config: Config, facts: HostFacts, fmt: str = "json") -> str:
    """`render`'s output: the JSON transaction the kernel is given, or the same table as nft text."""
    return printed(render(config, facts), fmt)


def printed(ruleset: Ruleset, fmt: str = "json") -> str:
    """A ruleset as the transaction that installs it (JSON), or as nft text."""
    if fmt == "nft":
        return ruleset_text(ruleset)
    return json.dumps(transaction(ruleset, Existing.empty()), indent=2) + "\n"


def cmd_render(args: SimpleNamespace, config: Config) -> int:
    if config.cleanup_only:
        print(_removal(config), end="")
        return 0
    print(rendered(config, facts_for(config, args.ipv6), args.format), end="")
    return 0


def apply_once(kernel: Kernel, router: Router, ruleset: Ruleset, config: Config, ipv6: bool,
               ) -> install.Applied:
    """Install the ruleset, and only when the kernel refuses it, find out which feature is missing.

    Probing first would cost every apply a check-mode transaction (an RCU grace period in the kernel,
    10-20 ms); a refused transaction changes nothing either, so probing afterwards names the same feature.
    """
    preflight.check_version(kernel)
    try:
        return install.apply(kernel, router, ruleset, reference=False)
    except KernelRefusedError:
        preflight.run(config, ipv6, kernel)
        raise


def _removal(config: Config) -> str:
    """What a cleanup sends the kernel: the table's deletion (TPROXY's routes go over netlink, not in it)."""
    return json.dumps(deletion(config.table), indent=2) + "\n"


def cmd_apply(args: SimpleNamespace, config: Config) -> int:
    if config.cleanup_only:
        return cmd_cleanup(args, config)
    if config.own_table:
        raise ConfigError("--own-table needs `interceptd run`: an owned table belongs to the process that made it, "
                          "and apply exits at once")
    if config.dry_run:
        # Istio's nft backend applies for real in dry-run; interceptd never touches the kernel.
        print(rendered(config, facts_for(config)), end="")
        return 0
    if not config.skip_rule_apply:
        facts = facts_for(config)
        ruleset = render(config, facts)
        applied = apply_once(NftKernel(), Netlink(), ruleset, config, facts.ipv6)
        rules = sum(len(c.rules) for c in ruleset.chains)
        print(f"interceptd: applied table inet {ruleset.table}: {len(ruleset.chains)} chains, {rules} rules, "
              f"{len(ruleset.sets)} sets in {applied.duration_s * 1000:.1f} ms", file=sys.stderr)
    if config.run_validation:
        return cmd_validate(args, config)
    return 0


def _start_agent(config: Config, command: str) -> None:
    """The one-shot flags make no sense for an agent that keeps the rules; then set up its logging."""
    from interceptd.runtime import logs

    for key in ("dry_run", "cleanup_only", "skip_rule_apply", "run_validation"):
        if getattr(config, key):
            raise ConfigError(f"{OPTIONS_BY_KEY[key].flag} cannot be used with {command}")
    logs.configure(config.log_level, config.log_format)


def cmd_run(args: SimpleNamespace, config: Config) -> int:
    from interceptd.runtime.agent import Agent

    _start_agent(config, "run")
    from interceptd.runtime.agent import doctor_checks

    agent = Agent(config, lambda: load_all(args.option_flags, config_path=args.config), config_path=args.config,
                  look_around=doctor_checks)
    return agent.run()


def cmd_cleanup(args: SimpleNamespace, config: Config) -> int:
    if config.dry_run:
        # dry-run promises no kernel change: show what would be sent and stop.
        print(_removal(config), end="")
        print(f"interceptd: dry run: table inet {config.table} and interceptd's TPROXY routes would be removed; "
              "nothing was changed", file=sys.stderr)
        return 0
    existed = install.remove(NftKernel(), Netlink(), config.table)
    print(f"interceptd: table inet {config.table} {'removed' if existed else 'was not installed'}",
          file=sys.stderr)
    return 0


def cmd_node(args: SimpleNamespace, config: Config) -> int:
    from interceptd.runtime.node import Node
    from interceptd.runtime.podsettings import dir_loader

    _start_agent(config, "node")
    return Node(config, dir_loader(args.option_flags, args.config, config.netns_config_dir)).run()


def cmd_status(args: SimpleNamespace, config: Config) -> int:
    kernel, table = NftKernel(), config.table
    if args.netns:
        from interceptd.runtime.node import agent_view, locate

        if args.explain_top is not None:
            raise ConfigError("--explain-top cannot be used with --netns: run it inside the namespace")
        path, table = locate(config, args.netns)
        kernel = NftKernel(netns=path)
        print(f"network namespace {args.netns} ({path}); {agent_view(config, args.netns)}")
    listing = kernel.list_table(table)
    if listing is None:
        print(f"interceptd: table inet {table} is not installed", file=sys.stderr)
        return 3
    if args.explain_top is not None:
        from interceptd.cli import explaincmd

        print(explaincmd.explain_top(config, facts_for(config), listing, args.explain_top,
                                     explaincmd.proposing(args)))
        return 0
    from interceptd.ruleset import status

    stats = status.chain_stats(listing)
    if args.json:
        print(json.dumps(status.as_json(table, stats, status.set_elements(listing)), indent=2))
    else:
        print(status.format_table(table, stats, status.set_elements(listing)))
    return 0


def cmd_validate(args: SimpleNamespace, config: Config) -> int:
    from interceptd.control.validate import run as run_validation

    run_validation(config, facts_for(config))
    print("interceptd: validation passed: the redirect works", file=sys.stderr)
    return 0


def cmd_explain(args: SimpleNamespace, config: Config) -> int:
    from interceptd.cli import explaincmd

    return explaincmd.run(args, config, facts_for(config))


def cmd_diff(args: SimpleNamespace, config: Config) -> int:
    from interceptd.cli.explaincmd import desired, installed
    from interceptd.control.reconcile import route_differences
    from interceptd.ruleset.tablediff import differences

    current = installed(config)
    ruleset = desired(config, current, lambda: facts_for(config))
    found = differences(ruleset, current) + route_differences(ruleset, Netlink())
    if args.json:
        print(json.dumps({"table": config.table, "equal": not found,
                          "differences": [{"reason": d.reason, "detail": d.detail} for d in found]}, indent=2))
    elif found:
        print("\n".join(d.detail for d in found))
    else:
        print(f"table inet {config.table} matches the configuration")
    return 1 if found else 0


def cmd_doctor(args: SimpleNamespace, config: Config) -> int:
    from interceptd.cli.explaincmd import proposing
    from interceptd.control import doctor
    from interceptd.ruleset.doctor import text

    report = doctor.run(config, NftKernel(), proposing(args))
    if args.json:
        print(json.dumps({"ok": report.ok, "checks": [f.as_json() for f in report.findings]}, indent=2))
    else:
        print(text(report.findings))
    return 0 if report.ok else 1
