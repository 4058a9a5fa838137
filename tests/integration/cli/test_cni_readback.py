"""interceptd-cni's ADD fails closed: the table read back right after its transaction must decide exactly as
the rendered ruleset, or ADD answers a CNI error and leaves no table and no record.

The change between apply and read-back is made by the plugin's test-only hook (INTERCEPTD_CNI_TEST_AFTER_APPLY):
it stands for another process that rewrites the pod's table at that very moment.
"""

from __future__ import annotations

import json
import os

import pytest
from support.netlab import delete_ns, new_ns, sh
from support.nodelab import CniNode, table_listing

from interceptd.cli.cni import E_READBACK, TEST_AFTER_APPLY_ENV
from interceptd.ruleset import names as N

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")
if not os.path.exists("/usr/lib/cni/bridge"):
    pytest.skip("containernetworking-plugins is not installed (make deps)", allow_module_level=True)

# A foreign rule at the head of the outbound chain: every connection of the pod would bypass the proxy.
BYPASS = {"nftables": [{"insert": {"rule": {"family": "inet", "table": "interceptd", "chain": N.ISTIO_OUTPUT,
                                            "comment": "foreign-bypass", "expr": [{"accept": None}]}}}]}


def test_add_whose_read_back_differs_fails_and_leaves_nothing() -> None:
    with CniNode() as node:
        pod = new_ns("-pod")
        try:
            prev = node.exec(node.plugins()[0], "ADD", f"/run/netns/{pod}", "c-rb")
            assert prev.rc == 0 and prev.out is not None, prev.stderr
            res = node.exec(node.plugins()[1], "ADD", f"/run/netns/{pod}", "c-rb", prev=prev.out,
                            args="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1",
                            env={TEST_AFTER_APPLY_ENV: json.dumps(BYPASS)})
            assert res.rc == 1 and res.out is not None, (res.out, res.stderr)
            assert res.out["code"] == E_READBACK and res.out["cniVersion"] == "1.0.0", res.out
            assert "read back" in res.out["msg"] and "foreign-bypass" in res.out["msg"], res.out
            assert "Traceback" not in res.stderr and "\n" not in res.out["msg"]
            assert table_listing(pod) is None
            assert not os.path.exists(os.path.join(node.state_dir, "netns", f"{pod}.json"))
            # Without the hook the same ADD succeeds, and its record names the pod.
            ok = node.exec(node.plugins()[1], "ADD", f"/run/netns/{pod}", "c-rb", prev=prev.out,
                           args="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1")
            assert ok.rc == 0, (ok.out, ok.stderr)
            with open(os.path.join(node.state_dir, "netns", f"{pod}.json"), encoding="utf-8") as fh:
                assert json.load(fh)["pod"] == ["demo", "web-1"]
            assert table_listing(pod) is not None
            assert sh("nft", "list", "table", "inet", "interceptd", ns=pod).returncode == 0
        finally:
            delete_ns(pod)
