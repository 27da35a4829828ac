import shutil
import types
import warnings

import pytest
import torch
import wandb

from ssl_toolkit.wandb_logger import WandbLogger, trust_ratio_metrics
from ssl_toolkit.wandb_offline import read_offline_history


@pytest.fixture(autouse=True)
def _offline_wandb_env(tmp_path, monkeypatch):
    """Keep W&B local and quiet: no API key, no user config, files under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))


class _FakeRun:
    """Stands in for a wandb Run to check calls without starting W&B."""

    id = "fake123"
    settings = types.SimpleNamespace(sync_file=None)

    def __init__(self):
        self.defined, self.rows, self.finished = [], [], 0

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def log(self, row):
        self.rows.append(row)

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_init(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.UsageError("No API key configured")
        run = _FakeRun()
        calls[-1]["run"] = run
        return run

    monkeypatch.setattr(wandb, "init", init)
    return calls


def _ratios() -> dict[str, torch.Tensor]:
    return {
        "backbone.conv1.weight": torch.tensor(0.0123456789),
        "backbone.fc.weight": torch.tensor(3.25e-4),
        "projector.0.bias": torch.tensor(1.0),
    }


def test_offline_run_history_holds_logged_values(tmp_path):
    run_dir = tmp_path / "run"
    config = {"method": {"name": "simclr"}, "optim": {"lr": 0.3}}
    logger = WandbLogger(mode="offline", run_dir=run_dir, config=config, tags=("test",))
    run_id = logger.run_id
    assert logger.enabled and isinstance(run_id, str)
    ratios = _ratios()
    logger.log({"train/loss": torch.tensor(4.5), "train/lr": 0.3, "train/img_per_s": 120.0}, 10)
    logger.log_trust_ratios(ratios, step=10)
    logger.log({"knn/top1": 0.625}, step=20)
    logger.finish()
    logger.finish()  # idempotent
    assert logger.run_id is None

    rows = read_offline_history(run_dir)
    assert [r["global_step"] for r in rows] == [10, 10, 20]
    assert rows[0]["train/loss"] == 4.5 and rows[0]["train/lr"] == 0.3
    assert rows[0]["train/img_per_s"] == 120.0
    for name, value in ratios.items():
        assert rows[1][f"lars/trust_ratio/{name}"] == value.item()
    assert rows[1]["lars/trust_ratio_hist"]["_type"] == "histogram"
    assert sum(rows[1]["lars/trust_ratio_hist"]["values"]) == len(ratios)
    assert rows[2]["knn/top1"] == 0.625
    assert all(run_id in str(p) for p in run_dir.rglob("*.wandb"))

    # Resuming with the stored id continues the same run; history spans both sessions.
    resumed = WandbLogger(mode="offline", run_dir=run_dir, config=config, run_id=run_id)
    assert resumed.run_id == run_id
    resumed.log({"train/loss": 2.0}, step=11)
    resumed.finish()
    rows = read_offline_history(run_dir)
    assert [r["global_step"] for r in rows] == [10, 10, 20, 11]
    assert rows[-1]["train/loss"] == 2.0


def test_history_spanning_many_blocks_and_truncated_file(tmp_path):
    run_dir = tmp_path / "run"
    logger = WandbLogger(mode="offline", run_dir=run_dir, config={})
    names = [f"backbone.layer{i}.conv.weight" for i in range(40)]
    expected = []
    for step in range(60):
        ratios = {n: torch.tensor(step + i / 64) for i, n in enumerate(names)}
        logger.log_trust_ratios(ratios, step=step)
        expected.append([r.item() for r in ratios.values()])
    logger.finish()
    (path,) = run_dir.rglob("*.wandb")
    assert path.stat().st_size > 3 * 32768  # records cross block boundaries
    rows = read_offline_history(run_dir)
    assert [[row[f"lars/trust_ratio/{n}"] for n in names] for row in rows] == expected

    cut = tmp_path / "cut" / path.name  # a run killed mid-write: keep what is complete
    cut.parent.mkdir()
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    partial = read_offline_history(cut)
    assert 0 < len(partial) < len(rows) and partial == rows[: len(partial)]


def test_init_arguments_and_step_metrics(tmp_path, fake_init):
    run_dir = tmp_path / "run"
    logger = WandbLogger(
        mode="offline", run_dir=run_dir, config={"a": 1}, run_id="abc", name="n", tags=["t"]
    )
    (kwargs,) = fake_init
    assert kwargs["mode"] == "offline" and kwargs["dir"] == str(run_dir)
    assert kwargs["id"] == "abc" and kwargs["resume"] == "allow"
    assert kwargs["config"] == {"a": 1} and kwargs["tags"] == ["t"] and kwargs["name"] == "n"
    assert run_dir.is_dir()
    run = kwargs["run"]
    assert ("global_step", {}) in run.defined
    for prefix in ("train", "lars", "knn"):
        assert (f"{prefix}/*", {"step_metric": "global_step"}) in run.defined
    assert logger.run_id == "fake123"

    WandbLogger(mode="offline", run_dir=run_dir, config={})
    assert fake_init[1]["resume"] is None and fake_init[1]["id"] is None


def test_online_failure_falls_back_to_offline_with_one_warning(tmp_path, fake_init):
    with pytest.warns(RuntimeWarning, match="offline") as record:
        logger = WandbLogger(mode="online", run_dir=tmp_path, config={})
    assert len(record) == 1
    assert [c["mode"] for c in fake_init] == ["online", "offline"]
    assert logger.enabled and logger.run_id == "fake123"


def test_logging_errors_are_warned_once_and_never_raised(tmp_path, fake_init):
    logger = WandbLogger(mode="offline", run_dir=tmp_path, config={})
    run = fake_init[0]["run"]

    def broken_log(row):
        raise ConnectionError("socket closed")

    run.log = broken_log
    with pytest.warns(RuntimeWarning, match="socket closed") as record:
        logger.log({"train/loss": 1.0}, step=1)
        logger.log_trust_ratios(_ratios(), step=1)
        logger.log({"train/loss": torch.ones(3)}, step=2)  # not a scalar: conversion fails
    assert len(record) == 1
    logger.finish()
    assert run.finished == 1


def test_tensor_values_become_floats_in_the_logged_row(tmp_path, fake_init):
    logger = WandbLogger(mode="offline", run_dir=tmp_path, config={})
    run = fake_init[0]["run"]
    logger.log(
        {"train/loss": torch.tensor(1.5, dtype=torch.bfloat16), "train/lr": torch.tensor(0.1)}, 7
    )
    (row,) = run.rows
    assert row == {"global_step": 7, "train/loss": 1.5, "train/lr": torch.tensor(0.1).item()}
    assert all(type(v) in (int, float) for v in row.values())


@pytest.mark.parametrize("kwargs", [{"enabled": False}, {"mode": "disabled"}])
def test_disabled_logger_is_a_no_op(tmp_path, monkeypatch, kwargs):
    def must_not_start(**_):
        raise AssertionError("wandb.init must not be called")

    monkeypatch.setattr(wandb, "init", must_not_start)
    run_dir = tmp_path / "run"
    logger = WandbLogger(run_dir=run_dir, config={"a": 1}, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log({"train/loss": torch.tensor(1.0)}, step=1)
        logger.log_trust_ratios(_ratios(), step=1)
        logger.finish()
    assert not logger.enabled and logger.run_id is None
    assert not run_dir.exists()


def test_trust_ratio_metrics_and_invalid_mode(tmp_path):
    assert trust_ratio_metrics({}) == {}
    metrics = trust_ratio_metrics(_ratios())
    assert set(metrics) == {f"lars/trust_ratio/{n}" for n in _ratios()} | {"lars/trust_ratio_hist"}
    assert isinstance(metrics["lars/trust_ratio_hist"], wandb.Histogram)
    with pytest.raises(ValueError, match="mode"):
        WandbLogger(mode="cloud", run_dir=tmp_path, config={})


def test_read_offline_history_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no W&B run file"):
        read_offline_history(tmp_path)
    bogus = tmp_path / "run-x.wandb"
    bogus.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_offline_history(tmp_path)


def test_an_image_is_logged_as_a_wandb_image_at_its_step(fake_init, tmp_path):
    from PIL import Image

    picture = tmp_path / "map.png"
    Image.new("RGB", (4, 3), "red").save(picture)
    logger = WandbLogger(mode="offline", run_dir=tmp_path / "run", config={})
    logger.log_image("lars/trust_ratio_heatmap", picture, step=7)
    (row,) = fake_init[-1]["run"].rows
    assert row["global_step"] == 7
    assert isinstance(row["lars/trust_ratio_heatmap"], wandb.Image)
