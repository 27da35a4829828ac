"""Download the wheels ``make gpu-check`` needs on a GPU machine without network.

``make gpu-wheels`` runs it.

Such a machine has its own Python 3.12 with torch, torchvision, timm, PyYAML, rich,
scikit-learn, matplotlib and pytest (:data:`GPU_MACHINE_HAS`), not the rest of the project's
dependencies. This script takes those from the installed project's requirements, downloads
them with everything they depend on as CPython 3.12 manylinux x86-64 wheels into ``.whl/``
(ignored by git, copied over with the working tree), and drops the wheels of what that
machine already has. It fails, saying so, when the folder would pass :data:`LIMIT_BYTES`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
LIMIT_BYTES = 64 * 2**20
GPU_MACHINE_HAS = frozenset(
    canonicalize_name(name)
    for name in (
        *("torch", "torchvision", "timm", "PyYAML", "rich", "scikit-learn", "matplotlib"),
        "pytest",
        # ... and what those depend on, which the project also imports or pulls in:
        *("numpy", "pillow", "packaging", "typing-extensions"),
    )
)
TARGET = [
    *("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"),
    *("--abi", "cp312", "--platform", "manylinux_2_28_x86_64"),
    *("--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"),
]
"""pip download's options for the GPU machine's interpreter and platform."""


def missing_requirements() -> list[str]:
    """The project's own requirements (no extras) that the GPU machine lacks."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("ssl-toolkit") or []]
    return [
        str(r)
        for r in requirements
        if r.marker is None and canonicalize_name(r.name) not in GPU_MACHINE_HAS
    ]


def wheel_name(path: Path) -> str:
    """The canonical distribution name of a wheel file (the part before its version)."""
    return canonicalize_name(re.split(r"-\d", path.name, maxsplit=1)[0])


def main() -> int:
    """Fill ``.whl/`` afresh; 0 on success, 1 when pip fails or the folder is too large."""
    requirements = missing_requirements()
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir()
    command = [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS), *TARGET]
    if subprocess.run([*command, *requirements]).returncode != 0:
        print(f"gpu-wheels: pip could not download {' '.join(requirements)}", file=sys.stderr)
        return 1
    for wheel in WHEELS.glob("*.whl"):
        if wheel_name(wheel) in GPU_MACHINE_HAS:
            wheel.unlink()
    wheels = sorted(WHEELS.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels for {', '.join(requirements)}: {size / 2**20:.1f} MiB in .whl/")
    if size >= LIMIT_BYTES:
        print(f"gpu-wheels: .whl/ holds {size / 2**20:.1f} MiB, over 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
