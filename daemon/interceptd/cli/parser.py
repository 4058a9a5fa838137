"""The argparse parser of the command line: every command's --help and errors, and every command line that
cli.main's plain reading of `apply` leaves. Imported only then: argparse, gettext and textwrap are not what
an init container's `istio-iptables` with plain flags should pay for.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from types import SimpleNamespace

from interceptd import __version__
from interceptd.cli.entry import AGENT_COMMANDS
from interceptd.cli.main import PILOT_AGENT_BOOLS, PILOT_AGENT_FLAGS, option_names
from interceptd.config import OPTIONS, Option
from interceptd.config.options import did_you_mean
from interceptd.errors import ConfigError

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

NAT_NOTE = ("Counters: nat chains see only the first packet of each connection, so their 'packets' count "
            "connections; mangle and raw chains count every packet.")

COMMANDS = {
    "render": "print the ruleset for the configuration, as nftables JSON or nft text (no root, no kernel)",
    "apply": "install the ruleset atomically and exit (init-container mode); a re-apply also removes the "
             "chains, sets and TPROXY routes the new configuration no longer needs",
    "run": "install the ruleset and keep it in place: repair drift, reload on SIGHUP (agent mode)",
    "cleanup": "remove everything interceptd installed (its table and TPROXY routes)",
    "status": "show the installed chains and rules with packet and byte counters",
    "validate": "run the redirect self-test of --run-validation (exit 126 on failure)",
    "explain": "where would this connection go, and why: the path through the rules and the verdict",
    "diff": "compare the configured ruleset with the installed table, chain by chain, rule by rule and set "
            "element by element (exit 0 equal, 1 different)",
    "doctor": "read-only checks of everything that decides whether traffic is captured, each with what to do "
              "(exit 0 nothing wrong, 1 something is)",
    "node": "keep interception in every pod network namespace of the node (CNI registrations, --netns-dir)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice and self.prog == "interceptd":
            message += did_you_mean(choice.group(1), COMMANDS)
        # argparse quotes stray arguments verbatim: escape control characters so the error stays one line.
        raise ConfigError("".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message))


# One example each, shown at the end of the command's --help.
EXAMPLES = {
    "render": "interceptd render -p 15001 -z 15006 -u 1337 -i '*' -b '*' --format nft",
    "apply": "interceptd apply -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020",
    "run": "interceptd run --config /etc/interceptd/interceptd.toml --metrics-address 127.0.0.1:15021",
    "cleanup": "interceptd cleanup --dry-run",
    "status": "interceptd status --explain-top 5",
    "validate": "interceptd validate -p 15001 -z 15006 -u 1337",
    "explain": "interceptd explain --outbound --dst 203.0.113.7:80 --uid 1000",
    "diff": "interceptd diff --config /etc/interceptd/interceptd.toml",
    "doctor": "interceptd doctor --config /etc/interceptd/interceptd.toml",
    "node": "interceptd node --config /etc/interceptd/interceptd.toml --netns-dir /run/netns",
}
# They read or remove the table: the capture flags are accepted (istio-iptables --cleanup-only passes them), not shown.
TABLE_ONLY = ("status", "cleanup")
SHOWN_EVERYWHERE = ("table", "resolv_conf")
SHOWN_FOR = {"cleanup": ("dry_run",)}


def _shown(option: Option, command: str | None) -> bool:
    """Which flags a command's --help lists: its own first, the capture flags where rules are rendered, the
    agent's where an agent runs. 50 flags on every page buried the few each command is about."""
    if option.scope == "compat":
        return False
    if command in SHOWN_FOR:
        return option.key in SHOWN_FOR[command] or option.key in SHOWN_EVERYWHERE
    if option.scope == "agent":
        return command in AGENT_COMMANDS or command is None or option.key in SHOWN_EVERYWHERE
    return command not in TABLE_ONLY


def _help(option: Option) -> str:
    env = f" [env: {', '.join(option.envs)}]" if option.envs else ""
    # A help text that explains its own default (-u, -g) must not be followed by a contradicting `Default: ''`.
    default = "" if "Default" in option.help else f" Default: {option.default!r}."
    return f"{option.help}{default} TOML: {option.key}.{env}"


def add_options(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file (below env and flags in precedence)")
    groups = {"capture": parser.add_argument_group("capture (istio-iptables flags)"),
              "compat": parser.add_argument_group("accepted for istio-iptables compatibility"),
              "agent": parser.add_argument_group("interceptd")}
    for option in OPTIONS:
        text = _help(option) if _shown(option, command) else argparse.SUPPRESS
        group = groups[option.scope]
        if option.kind == "bool":
            group.add_argument(*option_names(option), dest=option.key, action="store_const", const="true",
                               help=text)
        else:
            group.add_argument(*option_names(option), dest=option.key, metavar=option.key.upper(), help=text)
    for name in PILOT_AGENT_FLAGS:
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in PILOT_AGENT_BOOLS:
        parser.add_argument(f"--{name}", action="store_const", const="true", help=argparse.SUPPRESS)


def _epilog(command: str) -> str:
    hidden = [o.flag for o in OPTIONS if not _shown(o, command)]
    also = textwrap.fill(f"also accepted (istio-iptables compatibility, or not used by {command}): "
                         f"{', '.join(hidden)}.", break_on_hyphens=False)
    return f"example: {EXAMPLES[command]}\n\n{also}\n\n{textwrap.fill(NAT_NOTE)}"


def build_parser(only: str | None = None, alias: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; with `only`, the other subcommands get no options of their own (`only=""`: none has).

    Adding ~55 options to each of 10 subcommands is most of a one-shot command's parsing time, and argparse
    only ever looks at the subcommand being run: its help and errors, and the top level's, are the same.
    `alias`: invoked as istio-iptables, whose --help and --version are apply's under that name.
    """
    parser = _Parser(prog="interceptd", description="Transparent traffic interception for service meshes, "
                     "on nftables, compatible with istio-iptables.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=f"example: {EXAMPLES['apply']}\n\n`istio-iptables ARGS` (also `interceptd "
                     "istio-iptables ARGS`) is `interceptd apply ARGS`: Istio's init-container command line, "
                     f"unchanged.\n`interceptd COMMAND --help` shows each command's own flags first.\n\n{NAT_NOTE}")
    parser.add_argument("--version", action="version", version=f"interceptd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        own = only is None or name == only
        p = sub.add_parser(name, help=help_text, description=textwrap.fill(help_text[0].upper() + help_text[1:] + "."),
                           epilog=_epilog(name) if own else None, usage="%(prog)s [options]",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if alias and name == "apply":
            p.prog = "istio-iptables"
            p.add_argument("--version", action="version", version=f"istio-iptables (interceptd {__version__})")
        if not own:
            continue
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
            p.add_argument("--netns", metavar="NAME", help="show the table of a namespace the node agent keeps "
                           "(its name, or a namespace file's path)")
            p.add_argument("--explain-top", metavar="N", nargs="?", type=int, const=10,
                           help="the N busiest rules by counter (default 10), one line each on what they mean")
        if name == "explain":
            from interceptd.cli import explaincmd

            explaincmd.add_arguments(p)
        if name in ("diff", "doctor"):
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "render":
            p.add_argument("--ipv6", choices=("auto", "on", "off"), default="auto",
                           help="assume IPv6 on or off instead of reading the namespace's addresses")
            p.add_argument("--format", choices=("json", "nft"), default="json",
                           help="json: the libnftables transaction that is applied; nft: the same table as "
                           "`nft -f` text, each rule with its meaning")
        add_options(p, name)
    return parser


def _unrecognized(extra: list[str], parser: argparse.ArgumentParser, command: str | None) -> ConfigError:
    """Name the stray arguments with a hint: the closest flag for a typo, quoting for a shell-expanded `*`."""
    message = "unrecognized arguments: " + " ".join(extra)
    flags = [o for o in extra if o.startswith("-")]
    if flags and command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        message += did_you_mean(flags[0].partition("=")[0], sub._option_string_actions)
    elif all(os.path.exists(word) for word in extra):
        message += " (these are file names: the shell expanded an unquoted *; quote it, e.g. -i '*')"
    return ConfigError("".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message))


def parse_with_argparse(args_list: Sequence[str], alias: bool = False) -> tuple[SimpleNamespace, dict[str, str]]:
    """Normalised argv as argparse reads it: the arguments, and the flags given (option key -> text)."""
    # The top level has no option taking a value, so its first non-option argument is the subcommand.
    command = next((arg for arg in args_list if not arg.startswith("-")), "")
    parser = build_parser(command, alias)
    args, extra = parser.parse_known_args(args_list, namespace=SimpleNamespace())
    if extra:
        raise _unrecognized(extra, parser, args.command)
    if args.command is None:
        raise ConfigError("a command is needed: " + ", ".join(COMMANDS))
    return args, {o.key: getattr(args, o.key) for o in OPTIONS if getattr(args, o.key, None) is not None}
