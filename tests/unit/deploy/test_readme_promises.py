"""The README says what the repository does: what `kubectl apply -k` deploys, how long the long targets take,
and how node mode works."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()


def test_kustomize_statement_names_every_resource() -> None:
    kustomization = (ROOT / "config/kubernetes/kustomization.yaml").read_text()
    resources = re.findall(r"^  - (\S+\.yaml)$", kustomization, re.M)
    statement = README.split("`kubectl apply -k config/kubernetes/` applies", 1)[1].split("\n\n", 1)[0]
    assert "node-daemonset.yaml" in resources
    for resource in resources:
        assert resource in statement, resource


def test_durations_agree_with_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    soak = re.search(r"\(about (\d+) minutes, not in CI\)", makefile)
    assert soak is not None
    assert f"resource soak, about {soak.group(1)} minutes" in README
    assert re.search(r"make test +# .*\(\d+ to \d+ minutes", README)


def test_node_mode_has_a_section() -> None:
    section = README.split("## Node mode: `interceptd node` and `interceptd-cni`", 1)[1].split("\n## ", 1)[0]
    for words in ("interceptd-cni", "--netns-dir", "rewrites the node's CNI configuration", "status --netns"):
        assert words in section, words
