"""The fake stays honest: each hand-written document is refused by both the kernel (NftKernel in a lab
namespace) and FakeKernel, or accepted by both, and then both list the same table."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.netlab import Lab
from support.nftcases import ACCEPTED, REFUSED, Case, outcome, summary

from interceptd.system.fake import FakeKernel
from interceptd.system.kernel import NftKernel

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")


@pytest.fixture(scope="module")
def real() -> Iterator[NftKernel]:
    """One namespace for every case (each starts by deleting the table); Lab deletes it, also on failure."""
    with Lab() as lab:
        yield NftKernel(netns=f"/run/netns/{lab.pod}")


@pytest.mark.parametrize("case", REFUSED + ACCEPTED, ids=str)
def test_kernel_and_fake_judge_alike(real: NftKernel, case: Case) -> None:
    fake = FakeKernel()
    kernel_error, fake_error = outcome(real, case), outcome(fake, case)
    assert (kernel_error is None, fake_error is None) == (case.accepted, case.accepted), (kernel_error, fake_error)
    if case.accepted:
        assert summary(fake) == summary(real)
