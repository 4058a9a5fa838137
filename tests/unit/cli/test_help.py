"""Each command's --help: its own flags first, one example, the istio-iptables flags grouped after them."""

from __future__ import annotations

import pytest

from interceptd.cli.main import run_command
from interceptd.cli.parser import COMMANDS


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        run_command([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_own_flags_first_then_capture_then_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = _help(capsys, command)
    assert text.startswith(f"usage: interceptd {command} [options]\n")
    assert "\nexample: interceptd " + command in text
    assert "--log_output_level" not in text and "--native-nftables" not in text.split("also accepted")[0]
    if command in ("status", "cleanup"):
        shown = text.split("also accepted")[0]
        assert "--envoy-port" not in shown and len(shown.splitlines()) < 30
    else:
        assert text.index("--envoy-port") < text.index("also accepted")
    own = {"explain": "--dst ADDR:PORT", "status": "--explain-top", "render": "--format", "diff": "--json",
           "doctor": "--json"}.get(command)
    if own:
        assert text.index(own) < text.index("capture (istio-iptables flags)") if "capture (" in text else own in text
    if command not in ("run", "node"):
        assert "--reconcile-interval" not in text.split("also accepted")[0]


def test_owner_flags_state_one_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(capsys, "apply").split())
    for flag in ("--proxy-uid PROXY_UID", "--proxy-gid PROXY_GID"):
        entry = text.split(flag, 1)[1].split(" TOML: ", 1)[0]
        assert entry.count("Default") == 1, entry


def test_top_level_help_has_an_example_and_the_alias(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    assert "example: interceptd apply" in text and "`istio-iptables ARGS`" in text


def test_istio_iptables_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _help(capsys, "istio-iptables").startswith("usage: istio-iptables [options]")
    with pytest.raises(SystemExit) as done:
        run_command(["istio-iptables", "--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("istio-iptables (interceptd ")
