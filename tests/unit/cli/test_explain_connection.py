"""explain's connection defaults: an inbound connection needs no --src, --uid alone brings the user's group."""

from __future__ import annotations

import argparse
import ipaddress

from interceptd.cli.explaincmd import add_arguments, connection, proposing


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_inbound_needs_no_source() -> None:
    conn = connection(_args("--inbound", "--dst", "192.0.2.2:8080", "--iif", "eth0"))
    assert conn.src == ipaddress.ip_address("198.51.100.1") and conn.iif == "eth0"
    six = connection(_args("--inbound", "--dst", "[2001:db8::2]:8080", "--iif", "eth0"))
    assert six.src.version == 6


def test_uid_alone_brings_that_users_group() -> None:
    common = ("--dst", "198.51.100.1:80", "--src", "192.0.2.2", "--oif", "eth0")
    assert connection(_args(*common, "--uid", "0")).gid == 0
    assert connection(_args(*common, "--uid", "54321")).gid == 54321  # no such user: the same number
    assert connection(_args(*common, "--uid", "54321", "--gid", "7")).gid == 7


def test_only_capture_flags_or_a_config_file_propose_a_configuration() -> None:
    def args(flags: dict[str, str], config: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(option_flags=flags, config=config)

    assert not proposing(args({}))
    assert not proposing(args({"table": "other", "log_level": "debug"}))  # where to look, not what to install
    assert proposing(args({"service_cidr": "*"}))
    assert proposing(args({}, "/etc/interceptd/interceptd.toml"))
