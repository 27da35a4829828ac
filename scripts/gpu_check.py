"""Prove and measure the CUDA paths in one command: ``make gpu-check``.

On a machine with CUDA it runs, in at most 8 minutes (:data:`BUDGET_S`):

1. the CUDA tests (``pytest -m cuda``);
2. one LARS step on ResNet-50's and ViT-B/16's parameters against torch SGD foreach and the
   per-parameter original (median ms per step, the ratio to SGD, and the host syncs of a
   steady step counted with CUDA's sync debug mode);
3. a bf16 and an fp16 step of the ImageNet SimCLR recipe (ResNet-50, batch 128 at 224 px),
   split into data, augmentation, forward + backward and optimizer, with the share of
   augmentation plus optimizer;
4. ``make pretrain``'s run on the GPU, stopped by SIGTERM (checkpoint and all) if it takes
   more than 2 minutes.

It writes ``runs/gpu_check/gpu_report.json`` (and each stage's log beside it) and prints a
table naming the card; it exits 1 when a stage failed. Without CUDA it prints one line and
exits 2.

It runs on the machine's own ``python3`` with the repository on ``PYTHONPATH``, no virtual
environment. The packages the project needs beyond what such a machine has (pydantic, wandb,
webdataset) come as wheels in ``.whl/`` (``make gpu-wheels`` downloads them where the package
registries can be reached); they are installed once into ``.whl/site``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "gpu_check"
REPORT_FILE = "gpu_report.json"
WHEELS = ROOT / ".whl"
SITE = WHEELS / "site"
NEEDED = ("pydantic", "wandb", "webdataset")
"""The modules the project imports that the GPU machine may lack (its wheels are in .whl/)."""
CUDA_MARK = "pytest.mark.cuda"
BUDGET_S = 8 * 60
PRETRAIN_LIMIT_S = 120
LARS_MODELS = ("resnet50", "vit_b_16")
LARS_ROWS = (
    "torch SGD foreach",
    "LARS default (foreach=None)",
    "per-parameter LARS (original style)",
)
"""The rows of ``bench_optim.optimizers()`` measured here; the first is the reference."""
PROFILE_PHASES = ("data", "augmentation", "forward+backward", "optimizer")


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check (no torch for this Python, no CUDA device), or
    ``None`` when it can."""
    try:
        import torch
    except ImportError:
        return f"no CUDA here: torch is not installed for {sys.executable}"
    if not torch.cuda.is_available():
        return f"no CUDA here: torch {torch.__version__} sees no CUDA device"
    return None


def install_missing_packages() -> str | None:
    """Make :data:`NEEDED` importable, from the wheels in ``.whl/`` if need be (pip, no index,
    into ``.whl/site``, which goes first on ``sys.path`` and on the children's
    ``PYTHONPATH``); return why that failed, or ``None``."""
    if SITE.is_dir():
        sys.path.insert(0, str(SITE))
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        _export_path()
        return None
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return (
            f"{', '.join(missing)} missing for {sys.executable} and no wheels in .whl/: run "
            "`make gpu-wheels` where the package registries can be reached, then copy .whl/ here"
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    done = subprocess.run(
        [*pip, "--target", str(SITE), *map(str, wheels)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"pip could not install .whl/: {done.stderr.strip().splitlines()[-1:]}"
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    still = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if still:
        return f"{', '.join(still)} still missing after installing .whl/"
    _export_path()
    return None


def _export_path() -> None:
    """The repository (and ``.whl/site`` when there) on the ``PYTHONPATH`` of child processes."""
    paths = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else [])
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)  # no empty entry: it would add the cwd


def cuda_tests(limit_s: float) -> dict[str, Any]:
    """``pytest -m cuda``, its counts read from a JUnit XML file, the failures named.

    Only the test files that hold CUDA tests are collected: the others may import test-only
    packages (hypothesis, pytorch-lightning) that a GPU machine need not have.
    """
    files = [str(f) for f in sorted(ROOT.glob("tests/**/test_*.py")) if CUDA_MARK in f.read_text()]
    xml = OUT / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider"]
    with open(OUT / "cuda_tests.log", "w") as log:
        done = subprocess.run(
            [*command, "--junitxml", str(xml), *files],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=limit_s,
        )
    return {"exit_code": done.returncode, **junit_counts(xml)}


def junit_counts(path: Path) -> dict[str, Any]:
    """Tests passed, failed and skipped in a JUnit XML report, and the failed ones' ids."""
    cases = ET.parse(path).getroot().iter("testcase")
    failed, skipped, passed = [], 0, 0
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": len(failed), "skipped": skipped, "failures": failed}


def host_syncs(fn: Callable[[], Any], device: Any) -> int:
    """Host syncs made by ``fn()``: on CUDA, the warnings of the sync debug mode; on CPU, the
    count of ``optim.op_count`` (which sees the ops that would sync a GPU)."""
    import torch

    from optim.op_count import count_ops

    if device.type != "cuda":
        return count_ops(fn).syncs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def lars_steps(models: tuple[str, ...], steps: int, device: Any) -> dict[str, Any]:
    """For each model's parameter set, each row of :data:`LARS_ROWS`: median ms of an
    optimizer step over ``steps`` (rows taking turns), its ratio to SGD foreach, host syncs."""
    from bench_optim import optimizers, parameter_set, time_step

    makers = optimizers()
    result = {}
    for model_name in models:
        built = {label: makers[label](parameter_set(model_name, device)) for label in LARS_ROWS}
        for opt in built.values():
            time_step(opt, device)  # creates the state
        syncs = {label: host_syncs(opt.step, device) for label, opt in built.items()}
        times: dict[str, list[float]] = {label: [] for label in built}
        for _ in range(steps):
            for label, opt in built.items():
                times[label].append(time_step(opt, device))
        sgd_ms = statistics.median(times[LARS_ROWS[0]])
        result[model_name] = {
            label: {
                "ms": statistics.median(times[label]),
                "x_sgd": statistics.median(times[label]) / sgd_ms,
                "host_syncs": syncs[label],
            }
            for label in built
        }
    return result


def step_profile(precision: str, steps: int, overrides: list[str] | None = None) -> dict[str, Any]:
    """Median ms of each phase of a SimCLR step (the ImageNet recipe on the digits images at
    its 224 px; ``overrides`` change it), the device drained between phases, and the share
    of augmentation plus optimizer in the whole step."""
    import torch

    from ssl_toolkit.accumulation import accumulate
    from ssl_toolkit.config import load_config
    from ssl_toolkit.trainer import Trainer

    cfg = load_config(
        "imagenet/simclr",
        [
            "data.name=digits",
            "data.image_size=224",
            "data.num_workers=0",
            f"trainer.precision={precision}",
            "logging.wandb.mode=disabled",
            f"trainer.output_dir={OUT / f'profile_{precision}'}",
            *(overrides or []),
        ],
    )
    trainer = Trainer(cfg)
    device = trainer.device

    def drained() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    batches = trainer.image_batches()
    samples = []
    for _ in range(steps + 1):  # the first step pays the allocations and cuDNN's choices
        t0 = drained()
        images = next(batches)
        t1 = drained()
        views = trainer.views_of(images)
        t2 = drained()
        accumulate(
            trainer.method,
            [views],
            model=trainer.embed_model,
            scaler=trainer.scaler,
            autocast=trainer.autocast,
        )
        t3 = drained()
        trainer.scaler.step_and_update(trainer.optimizer)
        trainer.optimizer.zero_grad(set_to_none=True)
        t4 = drained()
        samples.append(dict(zip(PROFILE_PHASES, ((t1 - t0), (t2 - t1), (t3 - t2), (t4 - t3)))))
    ms = {p: statistics.median(s[p] for s in samples[1:]) * 1e3 for p in PROFILE_PHASES}
    step_ms = sum(ms.values())
    return {
        "model": cfg.model.backbone,
        "batch": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "ms": ms,
        "step_ms": step_ms,
        "images_per_s": cfg.data.batch_size / (step_ms / 1e3),
        "augmentation_plus_optimizer_share": (ms["augmentation"] + ms["optimizer"]) / step_ms,
    }


def pretrain(limit_s: float) -> dict[str, Any]:
    """``make pretrain``'s command on the GPU, SIGTERM after ``limit_s`` seconds (the trainer
    then saves a checkpoint and stops); what it reached, from its metrics file and summary."""
    from ssl_toolkit.metrics_file import METRICS_FILE, read_metrics

    run_dir = OUT / "pretrain"
    command = [sys.executable, "scripts/pretrain.py", "--config", "simclr_lars.yaml"]
    command += ["trainer.device=cuda", f"trainer.output_dir={run_dir}"]
    shutil.rmtree(run_dir, ignore_errors=True)  # the last check's run: this one starts afresh
    start = time.perf_counter()
    with open(OUT / "pretrain.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            code, stopped = child.wait(limit_s), False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            code, stopped = child.wait(180), True
    rows = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
    speeds = [r["train/img_per_s"] for r in rows if "train/img_per_s" in r]
    knn = [r["knn/top1"] for r in rows if "knn/top1" in r]
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "exit_code": code,
        "stopped_at_limit": stopped,
        "seconds": time.perf_counter() - start,
        "steps": max((r["global_step"] for r in rows), default=0),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "last_knn": knn[-1] if knn else None,
        "final_probes": summary.get("final_probes"),
    }


def run_stage(stages: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """``stages[name] = fn()`` with its seconds; an exception becomes the stage's one-line
    error, so that one broken stage leaves the others' numbers."""
    start = time.perf_counter()
    try:
        stages[name] = fn()
    except Exception as error:  # the report names it; the other stages still run
        stages[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    stages[name]["stage_seconds"] = round(time.perf_counter() - start, 1)


def failed_stages(report: dict[str, Any]) -> list[str]:
    """The stages that broke, whose tests failed, or whose pretraining ended in an error."""
    failed = [name for name, stage in report["stages"].items() if "error" in stage]
    tests = report["stages"].get("cuda_tests", {})
    if tests.get("failed") or tests.get("exit_code", 0) != 0:
        failed.append("cuda_tests")
    run = report["stages"].get("pretrain", {})
    if run.get("exit_code") not in (0, None) and not run.get("stopped_at_limit"):
        failed.append("pretrain")
    return sorted(set(failed))


def summary_table(report: dict[str, Any]) -> Any:
    """The check as one rich table: a row per measurement, the card in the title."""
    from rich.table import Table

    stages = report["stages"]
    table = Table(title=f"gpu-check on {report['device']} (torch {report['torch']})")
    table.add_column("stage")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, stage in stages.items():
        if "error" in stage:
            table.add_row(name, "error", stage["error"])
    tests = stages.get("cuda_tests", {})
    if "passed" in tests:
        counts = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        table.add_row("CUDA tests", "pytest -m cuda", counts)
    for model_name, rows in stages.get("lars", {}).items():
        if not isinstance(rows, dict):
            continue
        for label, row in rows.items():
            value = f"{row['ms']:.2f} ms, {row['x_sgd']:.2f}x SGD, {row['host_syncs']} syncs"
            table.add_row(f"optimizer step, {model_name}", label, value)
    for precision in ("bf16", "fp16"):
        profile = stages.get(f"profile_{precision}", {})
        if "ms" in profile:
            phases = ", ".join(f"{p} {profile['ms'][p]:.1f}" for p in PROFILE_PHASES)
            title = f"SimCLR {profile['model']} step, {precision}"
            table.add_row(title, f"ms: {phases}", f"{profile['images_per_s']:.0f} img/s")
            share = profile["augmentation_plus_optimizer_share"]
            table.add_row(title, "augmentation + optimizer share", f"{share:.1%}")
    run = stages.get("pretrain", {})
    if "steps" in run:
        ending = "stopped at the limit" if run["stopped_at_limit"] else f"exit {run['exit_code']}"
        knn = "-" if run["last_knn"] is None else f"kNN {run['last_knn']:.2%}"
        speed = "-" if run["images_per_s"] is None else f"{run['images_per_s']:.0f} img/s"
        table.add_row(
            "make pretrain on the GPU",
            f"{run['steps']} steps in {run['seconds']:.0f} s, {ending}",
            f"{speed}, {knn}",
        )
    table.caption = f"{report['seconds']:.0f} s in all; failed: {report['failed'] or 'none'}"
    return table


def write_report(report: dict[str, Any], out: Path = OUT) -> Path:
    """``gpu_report.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main() -> int:
    """Run the check; 0 when every stage passed, 1 when one failed, 2 without CUDA."""
    reason = no_cuda_reason() or install_missing_packages()
    if reason is not None:
        print(f"gpu-check: {reason}", file=sys.stderr)
        return 2
    import torch
    from rich.console import Console

    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = torch.device("cuda")
    stages: dict[str, dict[str, Any]] = {}
    run_stage(stages, "cuda_tests", lambda: cuda_tests(limit_s=210))
    run_stage(stages, "lars", lambda: lars_steps(LARS_MODELS, steps=20, device=device))
    for precision in ("bf16", "fp16"):
        run_stage(stages, f"profile_{precision}", lambda p=precision: step_profile(p, steps=10))
    left = BUDGET_S - (time.perf_counter() - start) - 30  # the SIGTERM's checkpoint and exit
    run_stage(stages, "pretrain", lambda: pretrain(min(PRETRAIN_LIMIT_S, max(left, 10))))
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "seconds": time.perf_counter() - start,
        "stages": stages,
    }
    report["failed"] = failed_stages(report)
    path = write_report(report)
    Console(width=140).print(summary_table(report))
    print(f"written: {path}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
