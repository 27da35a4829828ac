"""``metrics.jsonl``: every row the run logs, whatever the W&B mode, kept across resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_toolkit.checkpoint import step_checkpoints
from ssl_toolkit.metrics_file import (
    METRICS_FILE,
    RESUMED_KEY,
    MetricsFile,
    read_metrics,
    scan_metrics,
)
from ssl_toolkit.trainer import Trainer
from tests.ssl_toolkit.test_cli import TINY, run_cli
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config

# Wall-clock values differ between two runs of the same config.
TIMED = ("train/img_per_s",)


def _deterministic(rows: list[dict]) -> list[dict]:
    """The rows without wall-clock values, without the trust ratios, which every session
    logs at its first step too, and without the row that marks a resume."""
    return [
        {k: v for k, v in row.items() if k not in TIMED}
        for row in rows
        if not any(k.startswith("lars/trust_ratio/") for k in row) and RESUMED_KEY not in row
    ]


def test_the_file_holds_every_row_and_trust_ratio_the_logger_gets(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path), logger=logger)  # W&B disabled
    trainer.fit()
    rows = read_metrics(tmp_path / "run" / METRICS_FILE)
    ratio_rows = [r for r in rows if any(k.startswith("lars/trust_ratio/") for k in r)]
    metric_rows = [r for r in rows if r not in ratio_rows]
    assert metric_rows == [{"global_step": step, **m} for step, m in logger.rows]
    assert [r["global_step"] for r in ratio_rows] == [step for step, _ in logger.trust_ratios]
    for row, (_, ratios) in zip(ratio_rows, logger.trust_ratios, strict=True):
        assert row == {"global_step": row["global_step"]} | {
            f"lars/trust_ratio/{name}": value for name, value in ratios.items()
        }
    assert any("train/loss" in r for r in rows) and any("knn/top1" in r for r in rows)


def test_a_resumed_run_replaces_the_rows_after_its_checkpoint(tmp_path: Path) -> None:
    """Checkpoints and log rows every 2 steps: resumed from step 4, the rows of step 6 are
    dropped and logged again, and the file is the uninterrupted run's."""
    keep = {"checkpoint_every_steps": 2, "keep_checkpoints": 8}
    straight = tiny_config(tmp_path / "straight", **keep)
    Trainer(straight, logger=RecordingLogger()).fit()
    cfg = tiny_config(tmp_path / "cut", **keep)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=7)
    path = Path(cfg.trainer.output_dir) / METRICS_FILE
    assert 6 in [r["global_step"] for r in read_metrics(path)]
    checkpoints = step_checkpoints(path.parent / "checkpoints")
    earlier = next(p for p in checkpoints if int(p.stem.removeprefix("step-")) == 4)
    resumed = Trainer(cfg, resume=earlier, logger=RecordingLogger())
    assert resumed.step == 4
    resumed.fit()
    expected = _deterministic(read_metrics(Path(straight.trainer.output_dir) / METRICS_FILE))
    assert _deterministic(read_metrics(path)) == expected
    steps = [r["global_step"] for r in read_metrics(path)]
    assert steps == sorted(steps) and steps[-1] == 16
    ratio_steps = [
        r["global_step"]
        for r in read_metrics(path)
        if any(k.startswith("lars/trust_ratio/") for k in r)
    ]
    assert ratio_steps == [1, 4, 5, 8, 12, 16]  # every 4 steps, and each session's first
    assert [r["global_step"] for r in read_metrics(path) if RESUMED_KEY in r] == [4]


def test_rows_are_flushed_and_a_cut_last_line_is_left_out(tmp_path: Path) -> None:
    metrics = MetricsFile(tmp_path, resumed_at=0)
    metrics.log({"train/loss": torch.tensor(1.5), "train/lr": 0.1}, step=1)
    metrics.log({"train/loss": float("nan"), "other": object()}, step=2)
    text = (tmp_path / METRICS_FILE).read_text()  # before finish: flushed already
    assert [json.loads(line) for line in text.splitlines()] == [
        {"global_step": 1, "train/loss": 1.5, "train/lr": 0.1},
        {"global_step": 2, "train/loss": None},  # strict JSON, as summary.json
    ]
    with (tmp_path / METRICS_FILE).open("a") as file:
        file.write('{"global_step": 3, "train/lo')  # what a kill mid-write leaves
    assert [r["global_step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]
    metrics.finish()


def test_a_fresh_run_starts_the_file_anew_and_other_ranks_write_nothing(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"global_step": 9, "train/loss": 1.0}\n')
    MetricsFile(tmp_path / "other", resumed_at=0, enabled=False).log({"a": 1.0}, step=1)
    assert not (tmp_path / "other").exists()
    fresh = MetricsFile(tmp_path, resumed_at=0)
    fresh.log({"a": 2.0}, step=1)
    fresh.finish()
    assert read_metrics(tmp_path / METRICS_FILE) == [{"global_step": 1, "a": 2.0}]


DAMAGED = [
    b'{"global_step": 2, "train/loss": 1.0, "name": "caf\xff"}',  # not UTF-8
    b"not json",
    b'["global_step", 3]',  # not an object
    b'{"train/loss": 1.0}',  # no step
    b'{"global_step": "<b>4</b>"}',
    b'{"global_step": true}',
    b'{"global_step": -1}',
    b'{"global_step": 1.5}',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON reader recurses
    b'{"global_step": ' + b"9" * 5000 + b"}",  # more digits than Python converts
]


def test_damaged_lines_are_left_out_and_counted(tmp_path: Path) -> None:
    good = [{"global_step": 1, "train/loss": 2.0}, {"global_step": 5, "train/loss": 1.0}]
    lines = [json.dumps(good[0]).encode(), *DAMAGED, b"", json.dumps(good[1]).encode()]
    path = tmp_path / METRICS_FILE
    path.write_bytes(b"\n".join(lines) + b'\n{"global_step": 6, "tra')  # and a cut last line
    assert scan_metrics(path) == (good, len(DAMAGED))  # neither the blank nor the cut line
    assert read_metrics(path) == good


def test_resume_auto_over_a_damaged_metrics_file_keeps_its_good_rows(capsys, tmp_path) -> None:
    """One byte that is not UTF-8 (and a line of markup) in metrics.jsonl: ``--resume auto``
    warns with the count, keeps every good row up to its step, and logs on."""
    run = tmp_path / "run"
    args = ["--config", "simclr_lars", *TINY, "trainer.log_every_steps=1", "eval.baseline=false"]
    assert run_cli(capsys, *args, f"trainer.output_dir={run}")[0] == 0
    path = run / METRICS_FILE
    before = read_metrics(path)
    path.write_bytes(path.read_bytes() + DAMAGED[0] + b"\n" + DAMAGED[4] + b"\n")
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl: 2 damaged line\(s\) left out"):
        code, _, err = run_cli(
            capsys, *args, f"trainer.output_dir={run}", "trainer.max_steps=3", "--resume", "auto"
        )
    assert code == 0, err
    rows, damaged = scan_metrics(path)
    assert damaged == 0 and rows[: len(before)] == before
    assert [r["global_step"] for r in rows[len(before) :] if "train/loss" in r] == [3]
    assert {"global_step": 2, RESUMED_KEY: 2} in rows
