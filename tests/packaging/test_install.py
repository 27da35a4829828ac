"""A real (non-editable) install: the wheel ships the configs and the CLI runs from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "-q"],
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (a build leaves build/ behind in its tree)."""
    source = tmp_path_factory.mktemp("source") / "ssl-toolkit"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "runs", "wandb", "*.egg-info", "__pycache__", "tests"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-build-isolation", "-w", str(out), str(source))
    [built] = out.glob("ssl_toolkit-*.whl")
    return built


def test_the_wheel_ships_every_config(wheel: Path) -> None:
    shipped = {
        name.removeprefix("ssl_toolkit/configs/")
        for name in zipfile.ZipFile(wheel).namelist()
        if name.startswith("ssl_toolkit/configs/")
    }
    source = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert source and shipped == source


def test_installed_cli_dry_run_works_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    _pip("install", "--target", str(target), str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = {"cwd": elsewhere, "env": {**os.environ, "PYTHONPATH": str(target)}, "timeout": 300}
    where = subprocess.run(
        [sys.executable, "-c", "import ssl_toolkit.config as c; print(c.CONFIG_DIR)"],
        capture_output=True,
        text=True,
        check=True,
        **run,
    )
    assert Path(where.stdout.strip()) == target / "ssl_toolkit" / "configs"
    proc = subprocess.run(
        [str(target / "bin" / "ssl-pretrain"), "--config", "simclr_lars", "--dry-run"],
        capture_output=True,
        text=True,
        **run,
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: simclr" in proc.stdout and "backbone.conv1.weight" in proc.stdout
    assert not any(elsewhere.iterdir()), "a dry run writes nothing"
