"""The architecture is enforced: the import contract of `make lint`, and what the app bundle carries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "privacy", "client", "server", "embedded", "fedtune")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copies, not the installed project
    args = [str(LINT), str(tree / "pyproject.toml"), "--no-cache"]
    return subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages and its import contract."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")


def test_the_project_keeps_its_import_contract(tree: Path) -> None:
    done = _lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_a_layering_violation_breaks_the_contract(tree: Path) -> None:
    _append(tree / "client" / "site.py", "import server.coordinator  # a site importing the coordinator")
    _append(tree / "privacy" / "budget.py", "import flwr.app  # the privacy layer reaching for Flower")
    done = _lint(tree)
    assert done.returncode != 0
    assert "client.site -> server.coordinator" in done.stdout
    assert "privacy never imports Flower BROKEN" in done.stdout


def test_an_import_cycle_breaks_the_contract(tree: Path) -> None:
    _append(tree / "common" / "errors.py", "from common import fsutil  # errors -> fsutil")
    _append(tree / "common" / "fsutil.py", "from common import errors  # fsutil -> errors: a cycle")
    done = _lint(tree)
    assert done.returncode != 0
    assert "No import cycle between the modules of a package BROKEN" in done.stdout
    assert "No cycles are allowed in common" in done.stdout and ".fsutil -> .errors" in done.stdout


def test_the_app_bundle_carries_only_what_sites_and_coordinator_run(tmp_path: Path) -> None:
    """``flwr build`` packs fab-include: no embedded model or data, no provisioning, no CLI."""
    app = tmp_path / "app"
    for name in ("common", "privacy", "client", "server", "embedded", "fedtune", "tests", "docs"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, app / name)
    flwr = Path(sys.executable).with_name("flwr")
    done = subprocess.run(
        [str(flwr), "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [fab] = list(tmp_path.glob("*.fab"))
    files = zipfile.ZipFile(fab).namelist()
    top = {f.split("/")[0] for f in files if "/" in f}
    assert top == {"common", "privacy", "client", "server", ".info"}, sorted(files)
    shipped = {Path(f).stem for f in files}
    for module in (
        "tiny",
        "tiny_corpus",
        "synthdata",
        "synthvocab",
        "synthpii",
        "synthpii_vocab",
        "provision",
    ):
        assert module not in shipped, f"{module} ships to every site"
    assert {"client/client_app.py", "server/server_app.py", "privacy/budget.py"} <= set(files)
