"""A mistyped flag, command or TOML key gets the closest spelling; a shell-expanded `*` gets a hint to quote it;
one id in TOML is as good as a list of one; every TOML error names the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptd.cli.main import run_command


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run_command(list(argv)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_did_you_mean(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _error(capsys, "render", "--proxy-ud", "5").endswith("--proxy-ud 5 (did you mean '--proxy-uid'?)")
    assert _error(capsys, "rendr").endswith("(did you mean 'render'?)")
    toml = tmp_path / "c.toml"
    toml.write_text("envoy_prot = 15001\n")
    assert _error(capsys, "render", "--config", str(toml)).endswith(
        f"--config '{toml}': unknown key 'envoy_prot' (did you mean 'envoy_port'?)")


def test_unquoted_star_is_explained(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("Makefile", "README.md"):
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    assert "quote it, e.g. -i '*'" in _error(capsys, "render", "-i", "Makefile", "README.md")


def test_one_id_in_toml_is_a_list_of_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("proxy_uid = 4242\nproxy_gid = 4243\n")
    assert run_command(["render", "--config", str(toml), "--ipv6", "off", "--format", "nft"]) == 0
    out = capsys.readouterr().out
    assert "elements = { 4242 }" in out and "elements = { 4243 }" in out
    toml.write_text("redirect_dns = 1\n")
    assert _error(capsys, "render", "--config", str(toml)).endswith(
        f"--config '{toml}' key 'redirect_dns': expected true or false, got 1")


def test_reconcile_interval_zero_names_the_bound(capsys: pytest.CaptureFixture[str]) -> None:
    assert "must be from 0.1 to 86400 seconds" in _error(capsys, "run", "--reconcile-interval", "0")
