"""The nft text of every golden configuration is what the JSON installs: `nft -c -f` accepts it, and loading it
with `nft -f` in a lab namespace leaves the same table (normalised listing) as applying the JSON transaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.netlab import Lab, sh

from interceptd.cli import golden
from interceptd.ruleset.nftjson import Json, normalise

ROOT = Path(__file__).resolve().parents[3]
CASES = golden.cases(ROOT)


def _table(path: Path) -> str:
    """The table a golden declares (`table inet NAME {`), so the listing asks for the right one."""
    ((family, name),) = [line.split()[1:3] for line in path.read_text().splitlines() if line.startswith("table ")]
    return f"{family} {name}"


def _listing(lab: Lab, table: str) -> list[Json]:
    out = sh("nft", "-j", "list", "table", *table.split(), ns=lab.pod).stdout
    items: list[Json] = json.loads(out)["nftables"]
    return normalise(items)


@pytest.mark.netns
@pytest.mark.parametrize("name", sorted(CASES))
def test_nft_text_loads_as_the_json_does(lab: Lab, name: str, tmp_path: Path) -> None:
    text = golden.golden_path(ROOT, name)
    table = _table(text)
    checked = sh("nft", "-c", "-f", str(text), ns=lab.pod, check=False)
    assert checked.returncode == 0, checked.stderr
    sh("nft", "-f", str(text), ns=lab.pod)
    from_text = _listing(lab, table)
    sh("nft", "delete", "table", *table.split(), ns=lab.pod)

    document = tmp_path / f"{name}.json"
    document.write_text(golden.render_case(CASES[name], "json", name))
    sh("nft", "-j", "-f", str(document), ns=lab.pod)
    from_json = _listing(lab, table)
    assert from_text == from_json
    # The table really holds the rules (the host probe table is small: an entry and the two SNAT rules).
    assert sum("rule" in item for item in from_json) >= (3 if name.startswith(golden.HOST_PROBE_PREFIX) else 10)
