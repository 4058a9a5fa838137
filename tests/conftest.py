"""Shared fixtures. Integration tests need root (network namespaces); they are skipped without it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.netlab import Lab

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab() as lab:
        yield lab


@pytest.fixture
def lab6() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab(v6=True) as lab:
        yield lab
