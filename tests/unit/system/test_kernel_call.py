"""One libnftables call (NftKernel._context): the kernel's lock held and the agent's signals blocked for its
duration, both given back afterwards, also when the call cannot start. No libnftables needed: the context is
a stand-in object."""

from __future__ import annotations

import _thread
import signal

import pytest

from interceptd.errors import ResourceError
from interceptd.system import kernel as kernel_module
from interceptd.system.kernel import NftKernel

AGENT_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def _blocked() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set()) if s in AGENT_SIGNALS}


def _kernel(kept: object | None) -> NftKernel:
    kernel = NftKernel.__new__(NftKernel)  # not __init__: it would open a libnftables context
    kernel._lock = _thread.allocate_lock()
    kernel._kept = kept
    return kernel


def test_a_call_holds_the_lock_and_blocks_the_agents_signals_until_it_ends() -> None:
    context = object()
    kernel = _kernel(context)
    before = _blocked()
    with kernel._context() as nft:
        assert nft is context
        assert kernel._lock.locked()
        assert _blocked() == AGENT_SIGNALS
    assert not kernel._lock.locked()
    assert _blocked() == before


def test_a_call_that_cannot_start_gives_back_the_lock_and_the_signal_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_descriptor(what: str) -> None:
        raise ResourceError(f"{what}: no descriptor left")

    monkeypatch.setattr(kernel_module, "low_descriptor_free", no_descriptor)
    kernel = _kernel(None)  # a fresh context per call: the descriptor guard runs first
    before = _blocked()
    with pytest.raises(ResourceError), kernel._context():
        pass
    assert not kernel._lock.locked()
    assert _blocked() == before


def test_a_failing_call_gives_back_the_lock_and_the_signal_mask() -> None:
    kernel = _kernel(object())
    before = _blocked()
    with pytest.raises(KeyError), kernel._context():
        raise KeyError("in libnftables")
    assert not kernel._lock.locked()
    assert _blocked() == before
