"""Whatever the fuzzed flags/env/TOML parse into, libnftables accepts the rendered document (check mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.fuzz_strategies import FACTS, inputs
from support.netlab import Lab, sh

from interceptd.config import options as config
from interceptd.errors import ConfigError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.render import render

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1


@settings(max_examples=150 * SCALE, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs(hostile=False), st.sampled_from(FACTS))
def test_every_parsed_config_is_accepted_by_nft(lab: Lab, tmp_path: Path,
                                                given_input: tuple[dict[str, str], dict[str, str], dict[str, Any]],
                                                facts: HostFacts) -> None:
    flags, env, toml = given_input
    try:
        document = transaction(render(config.load(flags, env, toml, "fuzz.toml"), facts), Existing.empty())
    except ConfigError:
        event("refused")
        return  # the unit fuzz checks these errors
    event("checked by nft")
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    check = sh("nft", "-j", "-c", "-f", str(path), ns=lab.pod, check=False)
    assert check.returncode == 0, (flags, env, toml, check.stderr)
