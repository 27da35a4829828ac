"""``report.html``: drawn at the end of a run and for any run directory, one file that needs
no network, with one heatmap row per adapted parameter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.report import main as report
from ssl_toolkit.html_report import HEATMAP_FILE, REPORT_FILE, trust_ratios, write_report
from ssl_toolkit.metrics_file import METRICS_FILE, read_metrics
from ssl_toolkit.trainer import Trainer
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config


def _external_references(page: str) -> list[str]:
    """Everything in ``page`` a browser would fetch from elsewhere."""
    sources = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    return [s for s in sources if not s.startswith("data:")] + re.findall(r"url\(", page)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, RecordingLogger]:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("run")), logger=logger)
    trainer.fit()
    return trainer, logger


def test_a_finished_run_leaves_a_self_contained_report(finished) -> None:
    trainer, logger = finished
    page = (trainer.run_dir / REPORT_FILE).read_text()
    assert _external_references(page) == []
    assert page.count('src="data:image/png;base64,') == 3  # curves, heatmap, last ratios
    for text in ("LARS trust ratio", "random init", "linear, all labels", "method:"):
        assert text in page, text
    # One heatmap row per adapted parameter, in the optimizer's (the model's) order.
    adapted = list(trainer.optimizer.trust_ratios(adapted_only=True))
    ratios = trust_ratios(read_metrics(trainer.run_dir / METRICS_FILE))
    assert ratios.names == adapted and ratios.steps == [1, 4, 8, 12, 16]
    assert f"{len(adapted)} adapted parameters, in model order, at 5 logged steps" in page
    # W&B gets the heatmap as an image, at the last step.
    heatmap = trainer.run_dir / HEATMAP_FILE
    assert logger.images == [(16, "lars/trust_ratio_heatmap", heatmap)]
    assert (trainer.run_dir / HEATMAP_FILE).read_bytes().startswith(b"\x89PNG")


def test_the_script_draws_a_killed_run_and_a_resumed_one(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, checkpoint_every_steps=2)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=5)
    run = Path(cfg.trainer.output_dir)
    (run / REPORT_FILE).unlink()
    (run / "summary.json").unlink()  # as a kill leaves it: no summary
    assert report([str(run)]) == 0
    page = (run / REPORT_FILE).read_text()
    assert "No end-of-run probes" in page and _external_references(page) == []
    resumed = Trainer(cfg, resume=run / "checkpoints" / "last.pt", logger=RecordingLogger())
    resumed.fit(stop_at_step=9)
    assert report([str(run)]) == 0
    assert "<p>Resumed at step 5.</p>" in (run / REPORT_FILE).read_text()


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert report([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"report: {tmp_path} has no {METRICS_FILE}: not a run directory\n"


def test_trust_ratios_keep_model_order_and_the_last_row_of_a_step() -> None:
    rows = [
        {"global_step": 4, "lars/trust_ratio/b": 0.5, "lars/trust_ratio/a": 0.25},
        {"global_step": 2, "train/loss": 1.0},
        {"global_step": 8, "lars/trust_ratio/b": 0.1, "lars/trust_ratio/a": 0.2},
        {"global_step": 8, "lars/trust_ratio/b": 0.3, "lars/trust_ratio/a": 0.4},
    ]
    ratios = trust_ratios(rows)
    assert ratios.names == ["b", "a"] and ratios.steps == [4, 8]
    assert ratios.values == [[0.5, 0.3], [0.25, 0.4]]
    assert trust_ratios([{"global_step": 1, "train/loss": 1.0}]) is None


def test_a_run_without_rows_gets_a_report_that_says_so(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text("")
    page = write_report(tmp_path).read_text()
    assert "No rows logged yet." in page and "(no config.yaml)" in page
