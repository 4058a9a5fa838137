"""constraints-dev.txt pins every dev tool, and `make venv` installs through it: a new release of ruff, mypy,
pytest, ... cannot change what CI checks until someone refreshes the file on purpose. import-linter has a
venv of its own (.venv-lint, pinned in constraints-lint.txt): what it pulls in (rich) stays out of .venv,
whose agent the tests and benchmarks start."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINT_PYTHON = ROOT / ".venv-lint" / "bin" / "python"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(name: str = "constraints-dev.txt") -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
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


def test_import_linter_is_pinned_and_installed_through_its_constraints() -> None:
    assert "import-linter" in pins("constraints-lint.txt")
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -c constraints-lint.txt import-linter" in makefile
    assert re.search(r"^\$\(LINT_STAMP\):.*constraints-lint\.txt", makefile, re.M)


def test_the_lint_venv_holds_the_pinned_versions() -> None:
    if not LINT_PYTHON.exists():
        pytest.skip("no .venv-lint yet: `make lint` builds it")
    wanted = pins("constraints-lint.txt")
    script = "import sys; from importlib import metadata; print(*(metadata.version(n) for n in sys.argv[1:]))"
    got = subprocess.run([str(LINT_PYTHON), "-c", script, *wanted], capture_output=True, text=True, check=True)
    installed = dict(zip(wanted, got.stdout.split(), strict=True))
    differ = {name: (version, installed[name]) for name, version in wanted.items() if installed[name] != version}
    assert differ == {}, "constraints-lint.txt (pinned, installed); refresh the file or run `make clean lint`"


def test_the_runtime_venv_lacks_what_only_the_lint_venv_needs() -> None:
    # structlog's console renderer imports rich whenever it can: the agent here must start as users' does.
    present = set()
    for name in pins("constraints-lint.txt").keys() - pins().keys():
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        present.add(name)
    assert present == set(), "left over in .venv from before it had its own lint venv: run `make clean venv`"
