"""Surviving clusters and users: preemption, divergence, checkpoint keeping, export, W&B."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

from models import build_backbone
from ssl_toolkit.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    load_latest,
    step_checkpoints,
)
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.evaluation import Probes
from ssl_toolkit.export import export_backbone
from ssl_toolkit.health import Diverged
from ssl_toolkit.preemption import Preempted
from ssl_toolkit.trainer import Trainer
from ssl_toolkit.wandb_offline import read_offline_history, read_offline_summary
from tests.data.test_folders import unlabelled_folder
from tests.ssl_toolkit.test_checkpoint import Recorded
from tests.ssl_toolkit.test_trainer import RecordingLogger, _state, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **trainer: Any) -> ExperimentConfig:
    return tiny_config(tmp_path, checkpoint_every_steps=1, log_every_steps=1, **trainer)


def _loss_hook(trainer: Trainer, change) -> None:
    """Wrap the method's loss: ``change(step, loss)`` returns the loss to use."""
    compute = trainer.method.loss
    trainer.method.loss = lambda embeddings: change(trainer.step, compute(embeddings))


# --- checkpoints ------------------------------------------------------------------------


def test_the_newest_checkpoints_and_the_best_are_kept(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(_config(tmp_path, keep_checkpoints=2), logger=logger)
    trainer.fit()
    directory = Path(trainer.cfg.trainer.output_dir) / "checkpoints"
    assert [p.name for p in step_checkpoints(directory)] == ["step-00000016.pt", "step-00000015.pt"]
    assert os.path.samefile(directory / "last.pt", directory / "step-00000016.pt")
    knn = {step: m["knn/top1"] for step, m in logger.rows if "knn/top1" in m}
    best_step = max(knn, key=lambda s: (knn[s], -s))
    assert load_checkpoint(directory / "best.pt")["trainer"]["step"] == best_step
    assert load_checkpoint(directory / "best.pt")["trainer"]["best_knn"] == knn[best_step]


def test_a_resume_from_an_earlier_step_drops_the_abandoned_later_files(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    weights = Recorded([torch.ones(1)] * 5)
    checkpointer = Checkpointer(
        tmp_path, {"w": weights}, every_steps=1, steps_per_epoch=100, keep=2
    )
    for step in (8, 9, 10):
        checkpointer.save(step)
    assert [p.name for p in step_checkpoints(directory)] == ["step-00000010.pt", "step-00000009.pt"]
    # Resumed from an older checkpoint (copied back by hand): steps 4 and 5 are now the newest.
    checkpointer.save(4)
    assert [p.name for p in step_checkpoints(directory)] == ["step-00000004.pt"]
    checkpointer.save(5)
    assert [p.name for p in step_checkpoints(directory)] == ["step-00000005.pt", "step-00000004.pt"]
    assert os.path.samefile(directory / "last.pt", directory / "step-00000005.pt")
    os.unlink(directory / "step-00000005.pt")
    (directory / "last.pt").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"step-00000004\.pt instead"):
        path, _ = load_latest(tmp_path)
    assert path.name == "step-00000004.pt"


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path) -> None:
    straight = Trainer(_config(tmp_path / "a"), logger=RecordingLogger())
    straight.fit()
    cfg = _config(tmp_path / "b")
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=5)
    last = Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated (step-00000005.pt is the same file)
    with pytest.warns(RuntimeWarning, match=r"resuming from .*step-00000004\.pt instead"):
        resumed = Trainer(cfg, resume="auto", logger=RecordingLogger())
    assert resumed.step == 4
    resumed.fit()
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- divergence -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, precision: str
) -> None:
    logger = RecordingLogger()
    trainer = Trainer(_config(tmp_path, precision=precision), logger=logger)
    _loss_hook(trainer, lambda step, loss: loss * float("nan") if step >= 3 else loss)
    last = Path(trainer.cfg.trainer.output_dir) / "checkpoints" / "last.pt"
    with pytest.raises(Diverged) as info:
        trainer.fit()
    assert str(info.value) == (
        f"the loss became non-finite at step 3; training stopped and the last checkpoint, "
        f"{last} (step 2), is intact"
    )
    assert logger.finished  # the W&B run's files are complete
    state = load_checkpoint(last)
    assert state["trainer"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_counts_skipped_steps_and_stops_after_too_many_in_a_row(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(_config(tmp_path, precision="fp16", max_skipped_steps=3), logger=logger)
    _loss_hook(trainer, lambda step, loss: loss * float("inf"))  # every step overflows
    with pytest.raises(Diverged, match="3 steps in a row skipped on overflow by step 3"):
        trainer.fit()
    skipped = [(step, m["train/skipped_steps"]) for step, m in logger.rows]
    assert skipped == [(1, 1), (2, 2)]


def test_fp16_a_run_of_skips_that_ends_between_checks_still_stops(tmp_path: Path) -> None:
    # Checks come at step 6 (logging) only; steps 3-5 overflow, a run ended before the check.
    cfg = tiny_config(
        tmp_path,
        precision="fp16",
        max_skipped_steps=3,
        log_every_steps=6,
        checkpoint_every_steps=50,
        max_steps=8,
    )
    trainer = Trainer(cfg, logger=RecordingLogger())
    _loss_hook(trainer, lambda step, loss: loss * float("inf") if 3 <= step <= 5 else loss)
    with pytest.raises(Diverged, match="3 steps in a row skipped on overflow by step 6"):
        trainer.fit()


def test_fp16_skips_that_do_not_last_are_only_counted(tmp_path: Path) -> None:
    logger = RecordingLogger()
    cfg = _config(tmp_path, precision="fp16", max_skipped_steps=3, max_steps=6)
    trainer = Trainer(cfg, logger=logger)
    _loss_hook(trainer, lambda step, loss: loss * float("inf") if step in (3, 5) else loss)
    assert trainer.fit().steps == 6
    counts = [m["train/skipped_steps"] for _, m in logger.rows if "train/loss" in m]
    added = [after - before for before, after in zip([0, *counts], counts)]
    # Steps 3 and 5 overflow and are skipped; 4 and 6 are not (step 1 may overflow on its own:
    # the scaler starts at 2**16 and halves until the gradients fit).
    assert len(added) == 6 and added[2:] == [1, 0, 1, 0]


def test_the_cli_reports_a_divergence_in_one_line_and_exits_1(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_toolkit import cli
    from ssl_toolkit.methods import SimCLR

    loss_of = SimCLR.loss
    calls = []

    def nan_from_the_third_call(self, embeddings):
        calls.extend([1] if self.training else [])  # the dry forward before step 1 is in eval
        loss = loss_of(self, embeddings)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(SimCLR, "loss", nan_from_the_third_call)
    code = cli.main(
        [
            "--config",
            "simclr_lars",
            "model.backbone=timm/test_resnet",
            "data.name=synthetic",
            "data.batch_size=32",
            "method.projector={hidden_dim: 32, out_dim: 16}",
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            "trainer.log_every_steps=1",
            f"trainer.output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: the loss became non-finite at step 3; training stopped and no checkpoint " in err


# --- preemption -------------------------------------------------------------------------


def test_sigint_finishes_the_step_saves_and_stops(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path), logger=RecordingLogger())

    def interrupt_at_three(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    _loss_hook(trainer, interrupt_at_three)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(Preempted) as info:
        trainer.fit()
    assert (info.value.step, info.value.exit_code) == (3, 130)
    assert load_checkpoint(info.value.path)["trainer"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # restored


TINY = [
    "model.backbone=timm/test_resnet",
    "data.name=synthetic",
    "data.batch_size=32",
    "method.projector={hidden_dim: 32, out_dim: 16}",
    "trainer.device=cpu",
    "trainer.epochs=4",
    "trainer.checkpoint_every_steps=1",
    "logging.wandb.mode=offline",
]


def _pretrain(*args: str, **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts/pretrain.py"),
            "--config",
            "simclr_lars",
            *TINY,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigterm_saves_and_resume_auto_continues_bitwise(tmp_path: Path) -> None:
    """A real process, stopped by SIGTERM mid-run, then resumed: the same weights as a run
    that was never stopped, and the same W&B run."""
    run = tmp_path / "run"
    process = _pretrain(f"trainer.output_dir={run}", "eval.every_epochs=1")
    last = run / "checkpoints" / "last.pt"
    after_first_knn = last.with_name("step-00000008.pt")  # saved after the kNN of epoch 1
    deadline = time.monotonic() + 240
    while not after_first_knn.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 143, err[-2000:]
    stopped = load_checkpoint(last)["trainer"]["step"]
    assert f"stopped by SIGTERM after step {stopped}" in err and 8 <= stopped < 32
    resumed = _pretrain(f"trainer.output_dir={run}", "eval.every_epochs=1", "--resume", "auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resumed from {last} at step {stopped}" in err
    overrides = [*TINY, "eval.every_epochs=1", f"trainer.output_dir={tmp_path / 'straight'}"]
    straight = Trainer(load_config("simclr_lars", overrides), logger=RecordingLogger())
    straight.fit()
    final = load_checkpoint(last)["model"]
    expected = straight.checkpointer.state_dict()["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    history = read_offline_history(run)
    assert any(r.get("train/preempted_at") == stopped for r in history)
    knn = [(r["global_step"], r["knn/top1"]) for r in history if "knn/top1" in r]
    assert min(step for step, _ in knn) <= stopped < max(step for step, _ in knn)  # both sessions
    summary = read_offline_summary(run)
    assert summary["knn/best"] == max(top1 for _, top1 in knn)
    assert summary["knn/top1"]["max"] == max(top1 for step, top1 in knn if step > stopped)


def test_the_best_knn_survives_a_resume_whose_evaluations_are_worse(tmp_path: Path) -> None:
    """``knn/best`` is carried by the checkpoint: a resumed session logs the earlier best."""
    cfg = _config(tmp_path)
    first = Trainer(cfg, logger=RecordingLogger())
    first.evaluator.knn_top1 = lambda encoder: 0.75
    first.fit(stop_at_step=8)  # the epoch's kNN is at step 8
    logger = RecordingLogger()
    resumed = Trainer(cfg, resume="auto", logger=logger)
    resumed.evaluator.probes = lambda encoder: Probes(0.25, 0.5, 0.5, 10)
    resumed.fit()
    assert [(step, m["knn/best"]) for step, m in logger.rows if "knn/best" in m] == [(16, 0.75)]
    assert (
        load_checkpoint(Path(cfg.trainer.output_dir) / "checkpoints" / "best.pt")["trainer"]["step"]
        == 8
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_with_decoding_workers_saves_and_stops(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SLURM's SIGTERM and Ctrl-C reach every process of the group, the loader's workers too:
    they exit cleanly, and the main process finishes its step, saves and exits 128 + signum."""
    run = tmp_path / "run"
    process = _pretrain(
        f"data.root={unlabelled_folder(tmp_path / 'images', 64)}",
        "data.name=imagefolder",
        "data.num_workers=2",
        "trainer.epochs=100",
        f"trainer.output_dir={run}",
        "logging.wandb.mode=disabled",
        start_new_session=True,
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, err[-2000:]
    stopped = load_checkpoint(last)["trainer"]["step"]
    assert f"stopped by {signum.name} after step {stopped}" in err and stopped < 200
    assert "Traceback" not in err


# --- export -----------------------------------------------------------------------------


def test_every_run_exports_its_backbone_for_timm(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path, max_steps=2), logger=logger)
    trainer.fit()
    path = Path(trainer.cfg.trainer.output_dir) / "backbone.pt"
    assert logger.artifacts == [(path, "backbone-run", "model")]
    state = torch.load(path, weights_only=True)
    trained = trainer.method.backbone.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in state)
    build_backbone("timm/test_resnet").load_state_dict(state, strict=True)
    timm.create_model("test_resnet", num_classes=0).load_state_dict(state, strict=True)


def test_the_export_script_writes_a_torchvision_loadable_backbone(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=1).to_dict()
    cfg["model"]["backbone"] = "resnet18"
    trainer = Trainer(ExperimentConfig.from_dict(cfg), logger=RecordingLogger())
    trainer.fit(stop_at_step=1)
    out = tmp_path / "exported.pt"
    script = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/export_backbone.py"),
            str(trainer.run_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    missing = subprocess.run(
        [sys.executable, str(ROOT / "scripts/export_backbone.py"), str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: no checkpoint in {tmp_path / 'nothing' / 'checkpoints'}" in missing.stderr


def test_export_falls_back_from_a_corrupt_last_checkpoint_and_refuses_a_foreign_one(
    tmp_path: Path,
) -> None:
    trainer = Trainer(_config(tmp_path, max_steps=2), logger=RecordingLogger())
    trainer.fit()
    directory = trainer.run_dir / "checkpoints"
    os.unlink(directory / "step-00000002.pt")
    (directory / "last.pt").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"step-00000001\.pt instead"):
        out = export_backbone(trainer.run_dir, tmp_path / "from_step_1.pt")
    step_1 = load_checkpoint(directory / "step-00000001.pt")["model"]
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported[k], step_1[f"backbone.{k}"]) for k in exported)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=f"checkpoint {foreign} holds no model state"):
        export_backbone(trainer.run_dir, checkpoint=foreign)


# --- determinism ------------------------------------------------------------------------


def test_the_deterministic_switch(tmp_path: Path) -> None:
    try:
        trainer = Trainer(
            tiny_config(tmp_path, max_steps=2, deterministic=True), logger=RecordingLogger()
        )
        assert torch.are_deterministic_algorithms_enabled()
        # Kernels without a deterministic version (ResNet's pooling backward on CUDA) warn.
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert trainer.fit().steps == 2
        Trainer(tiny_config(tmp_path / "b", max_steps=1), logger=RecordingLogger())
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
