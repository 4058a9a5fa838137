"""The layers are a contract, not a convention: `make lint` (lint-imports) fails on an upward import.

Shown on a copy of the package tree, so the check itself is what is tested: the copy passes, then one module
of the pure ruleset layer imports the runtime layer, and the same command fails naming that import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = ROOT / ".venv-lint" / "bin" / "lint-imports"  # import-linter's own venv (Makefile: LINT_VENV)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "daemon")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, text=True, capture_output=True,
                          timeout=120)


def test_an_upward_import_fails_the_lint(tmp_path: Path) -> None:
    if not LINT_IMPORTS.exists():
        pytest.skip("no .venv-lint yet: `make lint` builds it")
    shutil.copytree(ROOT / "daemon" / "interceptd", tmp_path / "daemon" / "interceptd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = lint_imports(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    model = tmp_path / "daemon" / "interceptd" / "ruleset" / "model.py"
    model.write_text(model.read_text() + "\nfrom interceptd.runtime import agent  # noqa: E402,F401\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "interceptd.ruleset.model -> interceptd.runtime.agent" in broken.stdout, \
        broken.stdout
    assert str(tmp_path) in (Path(model).as_posix())  # the copy, never the real tree, was changed
    assert "interceptd.runtime" not in (ROOT / "daemon" / "interceptd" / "ruleset" / "model.py").read_text()
