"""The end of a run: what it writes, in which order, and what a kill during it leaves to
``--resume auto``. :class:`RunEnd` is tested against a fake evaluator; one test kills a real
run with SIGKILL while it writes ``backbone.pt``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ssl_toolkit.checkpoint import load_checkpoint
from ssl_toolkit.evaluation import Probes
from ssl_toolkit.metrics_file import read_metrics
from ssl_toolkit.report import TrainResult
from ssl_toolkit.run_end import RunEnd
from tests.ssl_toolkit.test_cli import ROOT, TINY, run_cli
from tests.ssl_toolkit.test_trainer import RecordingLogger

TRAINED = Probes(knn_top1=0.75, linear_top1=0.8, linear_top1_few_labels=0.5, labels_per_class=4)
RANDOM = Probes(knn_top1=0.25, linear_top1=0.3, linear_top1_few_labels=0.2, labels_per_class=4)


class FakeEvaluator:
    """The evaluator's part the end of a run uses: fixed probes for each encoder it is given
    (or an error), and every call recorded."""

    enabled = True

    def __init__(self, fails: dict[str, Exception] | None = None) -> None:
        self.calls: list[str] = []
        self.fails = fails or {}

    def probes(self, encoder) -> Probes:
        name = encoder.__name__
        self.calls.append(name)
        if name in self.fails:
            raise self.fails[name]
        return {"trained": TRAINED, "random": RANDOM}[name]


def trained(images):
    return images


def random(images):
    return images


class Recorder:
    """The trainer's side of a run end: its logger, links and stop checks, recorded."""

    def __init__(self) -> None:
        self.logger = RecordingLogger()
        self.linked: list[int] = []
        self.stop_checks = 0

    def stop_if_requested(self) -> None:
        self.stop_checks += 1


def _run_end(run: Path, evaluator: FakeEvaluator, trainer: Recorder, **options) -> RunEnd:
    return RunEnd(
        run,
        evaluator,
        features=trained,
        random_features=options.get("random_features", lambda: random),
        backbone_state=lambda: {"conv.weight": torch.ones(2, 3)},
        logger=lambda: trainer.logger,
        link_best=trainer.linked.append,
        stop_if_requested=trainer.stop_if_requested,
        console=Console(stderr=True),
    )


def _trained(run: Path, steps: int = 8, **figures) -> TrainResult:
    values = {"final_loss": 2.5, "images_per_s": 100.0, "seconds": 2.56} | figures
    return TrainResult(steps=steps, epochs=1.0, knn_top1=None, run_dir=run, **values)


def test_the_end_writes_the_backbone_and_summary_then_probes_and_links_the_best(
    tmp_path: Path,
) -> None:
    evaluator, trainer = FakeEvaluator(), Recorder()
    end = _run_end(tmp_path, evaluator, trainer)
    end.best_knn = 0.5  # an earlier kNN check of the run
    end.record_training(_trained(tmp_path))
    result = end.finish(_trained(tmp_path, seconds=3.0))  # the checkpoint's figures win
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: summary[k] for k in ("steps", "final_loss", "images_per_s", "seconds")} == {
        "steps": 8,
        "final_loss": 2.5,
        "images_per_s": 100.0,
        "seconds": 2.56,
    }
    assert summary["probes"] == {
        "knn_top1": 0.75,
        "linear_top1": 0.8,
        "linear_top1_few_labels": 0.5,
        "labels_per_class": 4,
    }
    assert summary["baseline"]["knn_top1"] == 0.25 and summary["knn_top1"] == 0.75
    assert result.probes == TRAINED and result.baseline == RANDOM and result.seconds == 2.56
    assert evaluator.calls == ["trained", "random"]
    assert trainer.linked == [8] and end.best_knn == 0.75 and trainer.stop_checks == 2
    backbone = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert torch.equal(backbone["conv.weight"], torch.ones(2, 3))
    assert trainer.logger.artifacts == [
        (tmp_path / "backbone.pt", f"backbone-{tmp_path.name}", "model")
    ]
    logged = {key: value for _, row in trainer.logger.rows for key, value in row.items()}
    assert logged["knn/best"] == 0.75 and logged["probe/baseline_linear_top1"] == 0.3


def test_a_probe_that_is_not_the_best_links_nothing(tmp_path: Path) -> None:
    trainer = Recorder()
    end = _run_end(tmp_path, FakeEvaluator(), trainer, random_features=None)
    end.best_knn = 0.9
    end.finish(_trained(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert trainer.linked == [] and end.best_knn == 0.9 and summary["baseline"] is None


def test_a_failing_probe_is_recorded_and_the_baseline_not_run(tmp_path: Path) -> None:
    evaluator = FakeEvaluator(fails={"trained": ValueError("class 3 has only 2 samples")})
    trainer = Recorder()
    end = _run_end(tmp_path, evaluator, trainer)
    end.record_training(_trained(tmp_path))
    result = end.finish(_trained(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["probes"] == {"error": "ValueError: class 3 has only 2 samples"}
    assert result.probe_error == "ValueError: class 3 has only 2 samples"
    assert summary["baseline"] is None and evaluator.calls == ["trained"]
    assert summary["final_loss"] == 2.5 and (tmp_path / "backbone.pt").is_file()


def test_resumed_at_the_end_it_takes_the_checkpoints_figures_and_runs_only_what_is_missing(
    tmp_path: Path,
) -> None:
    first = _run_end(
        tmp_path, FakeEvaluator(fails={"random": RuntimeError("no memory")}), Recorder()
    )
    first.record_training(_trained(tmp_path))
    first.finish(_trained(tmp_path))
    backbone = (tmp_path / "backbone.pt").stat().st_ino

    evaluator, trainer = FakeEvaluator(), Recorder()
    resumed = _run_end(tmp_path, evaluator, trainer)
    resumed.training, resumed.best_knn = first.training, first.best_knn  # from the checkpoint
    nothing = _trained(tmp_path, final_loss=float("nan"), images_per_s=0.0, seconds=0.004)
    result = resumed.finish(nothing, resumed_at_end=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert evaluator.calls == ["random"]  # the trained probes are kept from summary.json
    assert (result.final_loss, result.images_per_s, result.seconds) == (2.5, 100.0, 2.56)
    assert summary["final_loss"] == 2.5 and summary["baseline"]["knn_top1"] == 0.25
    assert (tmp_path / "backbone.pt").stat().st_ino == backbone


def test_figures_of_another_end_are_not_taken(tmp_path: Path) -> None:
    """A checkpoint of a run that ended at step 8, resumed by a run that ends at step 16."""
    end = _run_end(tmp_path, FakeEvaluator(), Recorder())
    end.record_training(_trained(tmp_path, steps=8))
    result = end.finish(_trained(tmp_path, steps=16, final_loss=1.5), resumed_at_end=True)
    assert result.final_loss == 1.5
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == 1.5


_KILLED_AT_RENAME = """
import os, signal, sys
from pathlib import Path

rename = os.replace

def kill_at(src, dst, *args, **kwargs):
    if Path(dst).name == sys.argv[1]:  # the file is written, under its temporary name
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)

os.replace = kill_at
from ssl_toolkit.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_run_killed_writing_its_backbone_resumes_with_its_training_figures(
    capsys, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["--config", "simclr_lars", *TINY, "eval.baseline=false", f"trainer.output_dir={run}"]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_RENAME, "backbone.pt", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(run.glob(".backbone.pt.*.tmp")) and not (run / "summary.json").exists()

    code, _, err = run_cli(capsys, *args, "--resume", "auto")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    losses = [
        row["train/loss"] for row in read_metrics(run / "metrics.jsonl") if "train/loss" in row
    ]
    assert summary["steps"] == 2 and summary["final_loss"] == pytest.approx(losses[-1])
    images = 2 * 32  # two steps of 32 images: what the killed session trained on
    assert summary["images_per_s"] * summary["seconds"] == pytest.approx(images)
    assert summary["probes"]["knn_top1"] is not None
    assert torch.load(run / "backbone.pt", weights_only=True)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert sorted(p.name for p in run.rglob("*.tmp")) == []  # the killed write's is removed
