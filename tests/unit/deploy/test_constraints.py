"""constraints-dev.txt pins every dev tool, and `make venv` installs through it: a new release of ruff, mypy,
pytest, ... cannot change what CI checks until someone refreshes the file on purpose."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "constraints-dev.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            out[canonical(name)] = version
    return out


def test_every_dev_tool_and_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["optional-dependencies"]["dev"] + project["dependencies"]
    names = {canonical(re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]) for spec in wanted}
    assert names - pins().keys() == set()


def test_the_venv_holds_the_pinned_versions() -> None:
    # metadata.version() answers with the copy first on sys.path, the one imported (the venv shadows Debian's).
    differ = {name: (version, metadata.version(name)) for name, version in pins().items()
              if metadata.version(name) != version}
    assert differ == {}, "constraints-dev.txt (pinned, installed); refresh the file or run `make clean venv`"


def test_make_venv_installs_through_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -c constraints-dev.txt -e '.[dev]'" in makefile
    assert re.search(r"^\$\(STAMP\):.*constraints-dev\.txt", makefile, re.M)
