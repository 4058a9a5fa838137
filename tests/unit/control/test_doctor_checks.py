"""doctor's kernel-feature check names what is missing, as preflight does, without changing anything."""

from __future__ import annotations

from interceptd.config import load
from interceptd.control.doctor import features
from interceptd.errors import KernelRefusedError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Json
from interceptd.system.fake import FakeKernel

FACTS = HostFacts(ipv6=True, host_ip=None)


class NoTproxy(FakeKernel):
    """A kernel without nft_tproxy: check mode refuses any transaction holding a tproxy statement."""

    def check(self, document: Json) -> None:
        if "tproxy" in str(document):
            raise KernelRefusedError("libnftables refused the transaction: Could not process rule: "
                                     "No such file or directory")
        super().check(document)


class OldLibnftables(FakeKernel):
    def version(self) -> str:
        return "0.9.8"


def test_features_name_the_missing_piece() -> None:
    tproxy = load({"inbound_interception_mode": "TPROXY", "inbound_ports": "*"}, {})
    assert features(tproxy, FACTS, FakeKernel()).ok
    missing = features(tproxy, FACTS, NoTproxy())
    assert not missing.ok and "lacks TPROXY (IPv4) support (modules: nft_tproxy" in missing.verdict
    assert features(load({}, {}), FACTS, NoTproxy()).ok  # REDIRECT needs no TPROXY
    old = features(load({}, {}), FACTS, OldLibnftables())
    assert not old.ok and "libnftables 0.9.8 is too old" in old.verdict
