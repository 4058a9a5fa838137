"""netns.entered: the calling thread is inside the namespace for the block and back home after it, also when
the block fails; a namespace that cannot be entered is NamespaceError with the thread left where it was."""

from __future__ import annotations

import os
import threading

import pytest
from support.netlab import delete_ns, new_ns

from interceptd.errors import NamespaceError
from interceptd.system import netns

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _here() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def test_the_block_runs_inside_and_the_thread_comes_back_also_on_failure() -> None:
    name = new_ns("-enter")
    try:
        home, pod = _here(), netns.identity(f"/run/netns/{name}")
        assert pod is not None and pod != home
        with netns.entered(f"/run/netns/{name}"):
            assert _here() == pod
            with netns.entered(f"/run/netns/{name}"):  # nested, from the same thread
                assert _here() == pod
            assert _here() == pod
        assert _here() == home
        with pytest.raises(KeyError), netns.entered(f"/run/netns/{name}"):
            raise KeyError("in the block")
        assert _here() == home
    finally:
        delete_ns(name)


def test_a_namespace_that_cannot_be_entered_leaves_the_thread_at_home() -> None:
    home = _here()
    with pytest.raises(NamespaceError, match="cannot open"), netns.entered("/run/netns/icd-no-such-namespace"):
        pytest.fail("the block must not run")
    assert _here() == home
    entered_elsewhere: list[bool] = []  # the one-thread-at-a-time lock was given back: another thread enters
    other = threading.Thread(target=lambda: entered_elsewhere.append(_enter_home()))
    other.start()
    other.join(timeout=10)
    assert entered_elsewhere == [True]


def _enter_home() -> bool:
    with netns.entered("/proc/thread-self/ns/net"):
        return True
