"""Pre-flight: each missing piece gives its own clear error, and only the features the config needs are probed."""

from __future__ import annotations

from typing import Any

import pytest

from interceptd.config import Config, load
from interceptd.errors import KernelRefusedError, PreflightError
from interceptd.system import preflight


class Probe:
    """Refuses documents whose rule contains `refuse` (a JSON fragment), the way NftKernel.check words it."""

    def __init__(self, version: str = "1.0.6", refuse: str = "", error: str = "") -> None:
        self._version, self.refuse, self.error = version, refuse, error
        self.checked: list[str] = []

    def version(self) -> str:
        return self._version

    def check(self, document: dict[str, Any]) -> None:
        text = str(document)
        self.checked.append(text)
        if self.refuse and self.refuse in text:
            raise KernelRefusedError(f"libnftables refused the transaction: command 3 of 3 (add rule inet "
                                     f"interceptd-preflight probe \"\"): internal:0:0-0: Error: {self.error}")


def cfg(**flags: str) -> Config:
    return load(flags, {})


def test_everything_present_passes_and_probes_only_what_is_needed() -> None:
    probe = Probe()
    preflight.run(cfg(), False, probe)
    assert len(probe.checked) == 1 and "redirect" in probe.checked[0] and "skuid" in probe.checked[0]
    assert "tproxy" not in probe.checked[0] and "zone" not in probe.checked[0]
    probe = Probe()
    preflight.run(cfg(inbound_interception_mode="TPROXY", redirect_dns="true"), True, probe)
    joined = " ".join(probe.checked)
    assert "'family': 'ip6', 'port': 15006" in joined and "'zone'" in joined


@pytest.mark.parametrize(("flags", "refuse", "needle"), [
    ({}, "redirect", "the kernel lacks NAT (redirect) support (modules: nf_nat"),
    ({"inbound_interception_mode": "TPROXY"}, "tproxy", "the kernel lacks TPROXY (IPv4) support"),
    ({"redirect_dns": "true"}, "'zone'", "the kernel lacks conntrack zones"),
    ({}, "skuid", "the kernel lacks socket owner matching"),
])
def test_missing_kernel_feature_is_named(flags: dict[str, str], refuse: str, needle: str) -> None:
    with pytest.raises(PreflightError) as err:
        preflight.run(cfg(**flags), False, Probe(refuse=refuse, error="Could not process rule: No such file or "
                                                                         "directory"))
    assert needle in str(err.value) and "nothing was changed" in str(err.value)


def test_old_libnftables_is_refused_by_version_and_by_parse_errors() -> None:
    with pytest.raises(PreflightError, match=r"libnftables 0\.9\.8 is too old: interceptd needs 1\.0\.1"):
        preflight.run(cfg(), False, Probe(version="0.9.8"))
    with pytest.raises(PreflightError, match="cannot express TPROXY .IPv4.; it is too old"):
        preflight.run(cfg(inbound_interception_mode="TPROXY"), False,
                      Probe(refuse="tproxy", error="Unknown statement object 'tproxy'."))


def test_version_parsing() -> None:
    assert preflight.parse_version("1.0.6") == (1, 0, 6)
    assert preflight.parse_version("1.1") == (1, 1)
    assert preflight.parse_version("unknown") == ()
