"""Command line: `interceptd render|apply|run|cleanup|status|validate`, and the `istio-iptables` alias.

The edge of the program: every InterceptdError becomes one line on stderr and its exit code. The argparse
parser (help, errors, every command but a plain `apply`) is in cli.parser, imported only when needed.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from interceptd.cli.entry import AGENT_COMMANDS
from interceptd.config import OPTIONS, Config, Option, load_all
from interceptd.errors import InterceptdError

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import NoReturn

# pilot-agent's logging flags reach istio-iptables in injected pods; accepted and ignored.
PILOT_AGENT_FLAGS = ("log_output_level", "log_stacktrace_level", "log_target", "log_caller", "log_rotate",
                     "log_rotate_max_age", "log_rotate_max_size", "log_rotate_max_backups")
PILOT_AGENT_BOOLS = ("log_as_json",)


def option_names(option: Option) -> list[str]:
    """`-p` and `--envoy-port`: how an option can be written on the command line."""
    return [f"-{option.short}", option.flag] if option.short else [option.flag]


_BOOL_FLAGS = {o.flag: o for o in OPTIONS if o.kind == "bool"}
_SHORT = {f"-{o.short}" for o in OPTIONS if o.short}


def normalise_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """pflag syntax argparse lacks: `--bool=false` and `-p=15001`. Returns argv and explicit booleans."""
    out: list[str] = []
    bools: dict[str, str] = {}
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in _BOOL_FLAGS:
            bools[_BOOL_FLAGS[name].key] = value
            out.append(name)
        elif eq and name in ("--log_as_json",):
            out.append(name)
        elif eq and name in _SHORT:
            out += [name, value]
        else:
            out.append(arg)
    return out, bools


# `apply`'s flags by exact spelling: the option key a flag's value goes to (None: accepted and ignored).
_TAKES_VALUE: dict[str, str | None] = {
    "--config": "config", **{name: o.key for o in OPTIONS if o.kind != "bool" for name in option_names(o)},
    **dict.fromkeys((f"--{name}" for name in PILOT_AGENT_FLAGS), None)}
_STANDS_ALONE: dict[str, str | None] = {
    **{name: o.key for o in OPTIONS if o.kind == "bool" for name in option_names(o)},
    **dict.fromkeys((f"--{name}" for name in PILOT_AGENT_BOOLS), None)}


def plain_apply(args_list: Sequence[str]) -> dict[str, str] | None:
    """The flags of an `apply` command line written the plain way (every flag spelled out in full, a value as
    the next argument, not beginning with '-'), read straight from the option table, `config` for --config.

    Building argparse's parser for 60 flags is most of what parsing costs `istio-iptables`, an init container's
    whole job. Anything else (help, --version, an abbreviation, `--flag=value`, `-p15001`, a value beginning
    with '-', a stray word, a missing value) is None: argparse decides it, errors included, as always.
    tests/unit/cli/test_plain_apply.py holds both ways to the same result.
    """
    if args_list[:1] != ["apply"]:
        return None
    flags: dict[str, str] = {}
    words = iter(args_list[1:])
    for word in words:
        if word in _STANDS_ALONE:
            key = _STANDS_ALONE[word]
            value = "true"
        elif word in _TAKES_VALUE:
            key, value = _TAKES_VALUE[word], next(words, "-")
            if value.startswith("-"):
                return None
        else:
            return None
        if key is not None:
            flags[key] = value
    return flags


def parse(argv: Sequence[str], env: Mapping[str, str] | None = None, alias: bool = False,
          ) -> tuple[SimpleNamespace, Config]:
    """The command line (and the environment, os.environ unless given) as arguments and a Config."""
    args_list, bools = normalise_argv(argv)
    flags = plain_apply(args_list)
    if flags is not None:
        args = SimpleNamespace(command="apply", config=flags.pop("config", None))
    else:
        from interceptd.cli.parser import parse_with_argparse

        args, flags = parse_with_argparse(args_list, alias)
    flags.update(bools)
    args.option_flags = flags  # `run` re-reads file and environment on SIGHUP; the flags stay
    return args, load_all(flags, env, config_path=args.config)


def _print_error(exc: InterceptdError) -> int:
    print(f"interceptd: error: {exc}", file=sys.stderr)
    return exc.exit_code


def run_command(argv: Sequence[str]) -> int:
    alias = argv[:1] == ["istio-iptables"]
    if alias:
        # Istio's injection template runs `<image entrypoint> istio-iptables ARGS` (pilot-agent's spelling):
        # with interceptd's image as the proxy-init image, that is `interceptd istio-iptables ARGS`.
        argv = ["apply", *argv[1:]]
    try:
        args, config = parse(argv, alias=alias)
        from interceptd.cli import commands  # after parsing: --help, --version and bad flags need none of it

        handler: Callable[[SimpleNamespace, Config], int] = getattr(commands, f"cmd_{args.command}")
        return handler(args, config)
    except InterceptdError as exc:
        return _print_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `interceptd status | head`: the reader left; say nothing more (and let no flush at exit complain).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def exit_one_shot(code: int) -> NoReturn:
    """End a one-shot process at once, without the interpreter's own tear-down.

    An init container's `istio-iptables` and a CNI ADD are whole processes; freeing every module and object
    at exit (nothing of it outlives the process) cost them about 5 ms CPU, an eighth of the seed's apply.
    Files are closed where they are written; stdout and stderr are flushed here: a reader that left makes it
    141 as in run_command (`interceptd status | head`), and, like the interpreter's own exit, a stdout that
    cannot be flushed otherwise (a full disk) turns success into exit code 120.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 141
    except OSError:
        code = code or 120
    os._exit(code)


def main() -> None:
    argv = sys.argv[1:]
    code = run_command(argv)
    if argv[:1] and argv[0] not in AGENT_COMMANDS:
        exit_one_shot(code)
    sys.exit(code)  # the agents end as always: their threads and logging shut down through the interpreter


def istio_iptables_main() -> None:
    """`istio-iptables ARGS`: Istio's init-container command line, unchanged."""
    argv = sys.argv[1:]
    # `istio-iptables istio-iptables ...` (pilot-agent's spelling through the alias) is run_command's case.
    exit_one_shot(run_command(argv if argv[:1] == ["istio-iptables"] else ["istio-iptables", *argv]))

