"""The SLURM example is valid bash, asks for what preemption needs, and its pretraining
command parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain.sbatch"


def test_the_script_is_valid_bash_with_the_directives_preemption_needs() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for line in ("#SBATCH --signal=B:TERM@120", "#SBATCH --requeue", "--resume auto"):
        assert line in text, line
    for variable in ("SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID"):
        assert f"${variable}" in text or f"${{{variable}}}" in text, variable


def test_its_pretrain_command_parses_with_dry_run(tmp_path: Path) -> None:
    env = os.environ | {
        "SSL_DRY_RUN": "1",
        "PYTHON": sys.executable,
        "OUTPUT_DIR": str(tmp_path / "run"),
        "CONFIG": "imagenet/simclr",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), "data.root=/data/imagenet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"output_dir: {tmp_path / 'run'}" in done.stdout
    assert "root: /data/imagenet" in done.stdout and "name: simclr" in done.stdout
    without = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env | {"OUTPUT_DIR": ""}, capture_output=True
    )
    assert without.returncode != 0 and b"set OUTPUT_DIR" in without.stderr
