"""``make gpu-check`` on a machine without CUDA, and its report code on a made-up result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from scripts import gpu_check, gpu_wheels

ROOT = Path(__file__).resolve().parents[2]


def _fake_report() -> dict:
    lars = {
        "torch SGD foreach": {"ms": 2.0, "x_sgd": 1.0, "host_syncs": 0},
        "LARS default (foreach=None)": {"ms": 3.0, "x_sgd": 1.5, "host_syncs": 0},
        "per-parameter LARS (original style)": {"ms": 40.0, "x_sgd": 20.0, "host_syncs": 483},
    }
    profile = {
        "model": "resnet50",
        "batch": 128,
        "image_size": 224,
        "ms": {"data": 1.0, "augmentation": 9.0, "forward+backward": 85.0, "optimizer": 5.0},
        "step_ms": 100.0,
        "images_per_s": 1280.0,
        "augmentation_plus_optimizer_share": 0.14,
    }
    stages = {
        "cuda_tests": {"exit_code": 1, "passed": 40, "failed": 1, "skipped": 2, "failures": ["x"]},
        "lars": {"resnet50": lars},
        "profile_bf16": profile,
        "profile_fp16": {"error": "RuntimeError: out of memory"},
        "pretrain": {
            "exit_code": 0,
            "stopped_at_limit": True,
            "seconds": 121.0,
            "steps": 240,
            "images_per_s": 9000.0,
            "last_knn": 0.9749,
            "final_probes": None,
        },
    }
    report = {"device": "NVIDIA H200", "torch": "2.11.0", "seconds": 400.0, "stages": stages}
    report["failed"] = gpu_check.failed_stages(report)
    return report


def test_the_table_names_the_card_and_every_measurement() -> None:
    report = _fake_report()
    assert report["failed"] == ["cuda_tests", "profile_fp16"]
    console = Console(record=True, width=220)
    console.print(gpu_check.summary_table(report))
    text = console.export_text()
    for expected in (
        "gpu-check on NVIDIA H200 (torch 2.11.0)",
        "40 passed, 1 failed, 2 skipped",
        "3.00 ms, 1.50x SGD, 0 syncs",
        "40.00 ms, 20.00x SGD, 483 syncs",
        "data 1.0, augmentation 9.0, forward+backward 85.0, optimizer 5.0",
        "1280 img/s",
        "14.0%",
        "RuntimeError: out of memory",
        "240 steps in 121 s, stopped at the limit",
        "9000 img/s, kNN 97.49%",
        "failed: ['cuda_tests', 'profile_fp16']",
    ):
        assert expected in text, expected


def test_the_report_file_holds_the_result(tmp_path: Path) -> None:
    report = _fake_report()
    path = gpu_check.write_report(report, tmp_path / "out")
    assert path.name == "gpu_report.json" and json.loads(path.read_text()) == report


def test_a_pretraining_stopped_by_the_limit_is_no_failure() -> None:
    report = _fake_report()
    report["stages"] = {"pretrain": report["stages"]["pretrain"]}
    assert gpu_check.failed_stages(report) == []
    report["stages"]["pretrain"].update(exit_code=2, stopped_at_limit=False)
    assert gpu_check.failed_stages(report) == ["pretrain"]


def test_junit_counts_name_the_failures(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="b" name="broken"><error message="y"/></testcase>'
        '<testcase classname="b" name="later"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(xml) == {
        "passed": 1,
        "failed": 2,
        "skipped": 1,
        "failures": ["a::bad", "b::broken"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without CUDA")
def test_without_cuda_it_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    reason = f"no CUDA here: torch {torch.__version__} sees no CUDA device"
    assert done.stderr == f"gpu-check: {reason}\n"


def test_a_python_without_torch_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    reason = f"no CUDA here: torch is not installed for {sys.executable}"
    assert gpu_check.no_cuda_reason() == reason


def test_missing_packages_without_wheels_name_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check, "NEEDED", ("pydantic", "no_such_module_here"))
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path)
    monkeypatch.setattr(gpu_check, "SITE", tmp_path / "site")
    reason = gpu_check.install_missing_packages()
    assert reason is not None and reason.startswith("no_such_module_here missing for ")
    assert "`make gpu-wheels`" in reason


def test_the_step_profile_splits_a_real_step(tmp_path: Path) -> None:
    small = ["trainer.device=cpu", "model.backbone=resnet18", "data.image_size=32"]
    small += ["data.batch_size=16", f"trainer.output_dir={tmp_path}"]
    profile = gpu_check.step_profile("bf16", steps=1, overrides=small)
    ms = profile["ms"]
    assert list(ms) == list(gpu_check.PROFILE_PHASES) and all(v > 0 for v in ms.values())
    assert profile["step_ms"] == pytest.approx(sum(ms.values()))
    share = (ms["augmentation"] + ms["optimizer"]) / profile["step_ms"]
    assert profile["augmentation_plus_optimizer_share"] == pytest.approx(share)
    assert profile["images_per_s"] == pytest.approx(16 / (profile["step_ms"] / 1e3))


def test_the_wheels_are_what_the_gpu_machine_lacks() -> None:
    names = {gpu_wheels.Requirement(r).name for r in gpu_wheels.missing_requirements()}
    assert names == {"pydantic", "wandb", "webdataset"}
    wheel = Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl")
    assert gpu_wheels.wheel_name(wheel) == "pydantic-core"
