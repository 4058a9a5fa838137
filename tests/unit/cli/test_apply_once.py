"""`apply`'s one transaction: the feature probes run only when the kernel refused it, and then name what is missing."""

from __future__ import annotations

from typing import Any

import pytest

from interceptd.cli.commands import apply_once
from interceptd.config import load
from interceptd.errors import KernelRefusedError, PreflightError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel, FakeRouter


class ProbedKernel(FakeKernel):
    """The fake kernel plus libnftables' version and check mode; check refuses documents holding `missing`."""

    def __init__(self, version: str = "1.0.6", missing: str = "") -> None:
        super().__init__()
        self._version, self.missing = version, missing
        self.checks = 0

    def version(self) -> str:
        return self._version

    def check(self, document: dict[str, Any]) -> None:
        self.checks += 1
        if self.missing and self.missing in str(document):
            raise KernelRefusedError("libnftables refused the transaction: Error: Could not process rule: "
                                     "No such file or directory")


CONFIG = load({}, {})
RULESET = render(CONFIG, HostFacts(ipv6=False, host_ip=None))


def test_an_accepted_transaction_costs_no_probe() -> None:
    kernel = ProbedKernel()
    apply_once(kernel, FakeRouter(), RULESET, CONFIG, False)
    assert kernel.applies == 1 and kernel.checks == 0
    assert kernel.list_table(RULESET.table) is not None


def test_a_refused_transaction_names_the_missing_feature() -> None:
    kernel = ProbedKernel(missing="redirect")
    kernel.refuse = 1
    with pytest.raises(PreflightError, match=r"the kernel lacks NAT \(redirect\) support .*nothing was changed"):
        apply_once(kernel, FakeRouter(), RULESET, CONFIG, False)
    assert kernel.checks >= 1 and kernel.list_table(RULESET.table) is None


def test_a_refusal_the_probes_cannot_explain_is_reported_as_it_is() -> None:
    kernel = ProbedKernel()
    kernel.refuse = 1
    with pytest.raises(KernelRefusedError, match=r"refused the transaction \(fake\)"):
        apply_once(kernel, FakeRouter(), RULESET, CONFIG, False)
    assert kernel.checks == 1


def test_an_old_libnftables_is_refused_before_any_transaction() -> None:
    kernel = ProbedKernel(version="0.9.8")
    with pytest.raises(PreflightError, match=r"libnftables 0\.9\.8 is too old"):
        apply_once(kernel, FakeRouter(), RULESET, CONFIG, False)
    assert kernel.applies == 0
