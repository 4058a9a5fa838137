"""The console scripts turn the cyclic garbage collector off for one-shot commands only."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from interceptd.cli import cni, entry
from interceptd.cli import main as cli_main


@pytest.fixture(autouse=True)
def _collector_back_on() -> Iterator[None]:
    yield
    gc.enable()


def _seen(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[bool]:
    """Replace the command's main by one that records whether the collector was on when it ran."""
    seen: list[bool] = []
    monkeypatch.setattr(module, name, lambda: seen.append(gc.isenabled()))
    return seen


@pytest.mark.parametrize(("argv", "collecting"), [
    (["interceptd", "apply", "-p", "15001"], False),
    (["interceptd", "cleanup"], False),
    (["interceptd", "status"], False),
    (["interceptd", "run", "--config", "x.toml"], True),
    (["interceptd", "node"], True),
])
def test_interceptd_collects_only_for_agents(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                              collecting: bool) -> None:
    monkeypatch.setattr("sys.argv", argv)
    seen = _seen(monkeypatch, cli_main, "main")
    entry.interceptd()
    assert seen == [collecting]


def test_istio_iptables_and_cni_are_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["istio-iptables", "-p", "15001"])
    alias = _seen(monkeypatch, cli_main, "istio_iptables_main")
    plugin = _seen(monkeypatch, cni, "main")
    entry.istio_iptables()
    gc.enable()
    entry.interceptd_cni()
    assert alias == [False] and plugin == [False]
