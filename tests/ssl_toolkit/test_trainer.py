"""The trainer end to end on tiny synthetic data: resume, logging, schedule, precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from rich.console import Console
from torch import nn

from optim import warmup_cosine
from ssl_toolkit.checkpoint import load_checkpoint, save_checkpoint
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import SimCLRAugment
from ssl_toolkit.evaluation import encode, eval_datasets, knn_top1, linear_probe
from ssl_toolkit.methods import METHODS, Method, MethodConfig, cosine_tau, register_method
from ssl_toolkit.trainer import Trainer
from ssl_toolkit.wandb_offline import read_offline_history
from tests.data.test_folders import _jpeg, unlabelled_folder


def tiny_config(tmp_path: Path, method: str = "simclr", **trainer: Any) -> ExperimentConfig:
    """A timm test ResNet on 256 synthetic 32 px images, batches of 32: 8 steps per epoch."""
    heads = {"projector": {"hidden_dim": 32, "out_dim": 16}}
    if method == "byol":
        heads["predictor"] = {"hidden_dim": 32, "out_dim": 16}
    return ExperimentConfig.from_dict(
        {
            "method": {"name": method, **heads},
            "model": {"backbone": "timm/test_resnet"},
            "data": {"name": "synthetic", "batch_size": 32, "image_size": 32},
            "optim": {
                "name": "lars",
                "lr": 1.0,
                "exclude_from_layer_adaptation": ["@norm", "@bias"],
                "exclude_from_weight_decay": ["@norm", "@bias"],
            },
            "schedule": {"warmup_epochs": 0.5},
            "trainer": {
                "epochs": 2,
                "device": "cpu",
                "output_dir": str(tmp_path / "run"),
                "checkpoint_every_steps": 3,
                "log_every_steps": 2,
                **trainer,
            },
            "logging": {"wandb": {"mode": "disabled"}, "trust_ratio_every": 4},
            "eval": {"every_epochs": 1, "knn_k": 5, "batch_size": 128},
        }
    )


class RecordingLogger:
    """A logger double: keeps every call instead of writing a W&B run."""

    run_id = "recorded"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.trust_ratios: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str, str]] = []
        self.images: list[tuple[int, str, Path]] = []
        self.finished = False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_trust_ratios(self, ratios: dict[str, torch.Tensor], step: int) -> None:
        self.trust_ratios.append((step, {k: v.item() for k, v in ratios.items()}))

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.images.append((step, key, Path(path)))

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        self.artifacts.append((Path(path), name, kind))

    def finish(self) -> None:
        self.finished = True


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = dict(trainer.method.state_dict())
    for i, state in trainer.optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in state.items()})
    return tensors


def _assert_same_state(straight: Trainer, resumed: Trainer) -> None:
    """Every weight, buffer and optimizer state tensor bit for bit."""
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow_twins"])
def test_resume_continues_bit_identically(tmp_path: Path, method: str) -> None:
    """2N steps straight equal N steps, a checkpoint, a fresh trainer, and N more steps."""
    straight = Trainer(tiny_config(tmp_path / "a", method), logger=RecordingLogger())
    straight.fit()

    cfg = tiny_config(tmp_path / "b", method)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=5)  # mid-epoch, mid-warmup
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = Trainer(
        cfg,
        resume=Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt",
        logger=RecordingLogger(),
    )
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == straight.step == 16
    _assert_same_state(straight, resumed)


def _in_the_earlier_layout(path: Path) -> Path:
    """The checkpoint at ``path`` as the trainer wrote it before components saved themselves
    (the counters at the top level; the loader's position alone), written next to it."""
    state = load_checkpoint(path)
    counters = state.pop("trainer")
    loader = {key: state["loader"][key] for key in ("epoch", "position", "generator")}
    old = {**state, **counters, "loader": loader, "epoch": loader["epoch"]}
    save_checkpoint(path.with_name("earlier.pt"), old)
    return path.with_name("earlier.pt")


@pytest.mark.parametrize("layout", ["current", "earlier"])
def test_resume_with_exact_accumulation_continues_bit_identically(
    tmp_path: Path, layout: str
) -> None:
    """Two micro-batches per step, exact: stopped mid-epoch and resumed (also from a
    checkpoint of the earlier layout), the run ends as the uninterrupted one."""
    options = {"accumulate_grad_batches": 2, "accumulation": "exact"}
    straight = Trainer(
        tiny_config(tmp_path / "a", "barlow_twins", **options), logger=RecordingLogger()
    )
    straight.fit()
    cfg = tiny_config(tmp_path / "b", "barlow_twins", **options)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=3)  # epoch 1, step 3 of 4
    last = Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt"
    path = last if layout == "current" else _in_the_earlier_layout(last)
    resumed = Trainer(cfg, resume=path, logger=RecordingLogger())
    assert resumed.step == 3 and resumed.loader.position == 6
    resumed.fit()
    assert resumed.step == straight.step == 8
    _assert_same_state(straight, resumed)


def test_a_resume_with_another_batch_size_keeps_the_images_seen(tmp_path: Path) -> None:
    """Stopped after 3 steps of 2 micro-batches of 32 (192 images), resumed with micro-batches
    of 16: step 6 of this run (6 x 2 x 16 = 192), the loader at micro-batch 12, same epoch."""
    saved = tiny_config(tmp_path, accumulate_grad_batches=2, max_steps=3)
    Trainer(saved, logger=RecordingLogger()).fit()
    cfg = saved.to_dict()
    cfg["data"]["batch_size"] = 16
    cfg["trainer"]["max_steps"] = None
    resumed = Trainer(ExperimentConfig.from_dict(cfg), resume="auto", logger=RecordingLogger())
    assert resumed.steps_per_epoch == 8
    assert (resumed.step, resumed.loader.epoch, resumed.loader.position) == (6, 0, 12)


def test_logged_metrics_follow_schedule_and_optimizer(tmp_path: Path) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path), logger=logger)
    result = trainer.fit()
    assert logger.finished
    train_rows = {step: m for step, m in logger.rows if "train/loss" in m}
    assert sorted(train_rows) == [2, 4, 6, 8, 10, 12, 14, 16]  # steps count from 1
    for step, metrics in train_rows.items():
        # Step s is the s-th update: the schedule's position s - 1.
        expected = warmup_cosine(step - 1, total_steps=16, warmup_steps=4, peak_lr=32 / 256)
        assert metrics["train/lr"] == pytest.approx(expected)
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))
        assert metrics["train/img_per_s"] > 0
    knn_rows = [(step, m["knn/top1"]) for step, m in logger.rows if "knn/top1" in m]
    assert [step for step, _ in knn_rows] == [8, 16]  # each epoch end; not twice at the end
    assert result.knn_top1 == knn_rows[-1][1]
    assert [step for step, _ in logger.trust_ratios] == [1, 4, 8, 12, 16]
    _, last_ratios = logger.trust_ratios[-1]
    applied = trainer.optimizer.trust_ratios(adapted_only=True)
    assert last_ratios == {k: v.item() for k, v in applied.items()}
    assert all(not k.endswith("bias") and "bn" not in k for k in last_ratios)
    assert (Path(trainer.cfg.trainer.output_dir) / "config.yaml").is_file()
    ckpt = torch.load(
        Path(trainer.cfg.trainer.output_dir) / "checkpoints" / "last.pt", weights_only=True
    )
    assert ckpt["trainer"]["step"] == 16 and ckpt["trainer"]["wandb_run_id"] == "recorded"


def test_byol_logs_the_tau_of_each_step(tmp_path: Path) -> None:
    logger = RecordingLogger()
    Trainer(tiny_config(tmp_path, "byol", max_steps=3, log_every_steps=1), logger=logger).fit()
    taus = [(step, m["method/tau"]) for step, m in logger.rows if "train/loss" in m]
    assert taus == [(s, pytest.approx(cosine_tau(s - 1, 3, 0.996, 1.0))) for s in (1, 2, 3)]


def test_real_offline_run_logs_the_optimizers_trust_ratios(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=4)
    cfg = cfg.model_copy(
        update={
            "logging": cfg.logging.model_copy(
                update={
                    "wandb": cfg.logging.wandb.model_copy(update={"mode": "offline"}),
                }
            )
        }
    )
    trainer = Trainer(cfg)
    trainer.fit()
    history = read_offline_history(Path(cfg.trainer.output_dir))
    ratio_rows = [r for r in history if any(k.startswith("lars/trust_ratio/") for k in r)]
    assert [r["global_step"] for r in ratio_rows] == [1, 4]
    applied = trainer.optimizer.trust_ratios(adapted_only=True)
    logged = {
        k.removeprefix("lars/trust_ratio/"): v
        for k, v in ratio_rows[-1].items()
        if k.startswith("lars/trust_ratio/") and k != "lars/trust_ratio_hist"
    }
    assert logged.keys() == applied.keys()
    for name, value in applied.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-6)
    assert any("train/loss" in r for r in history)
    assert any("knn/top1" in r for r in history)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_learns_finite(tmp_path: Path, precision: str) -> None:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path, precision=precision, max_steps=3), logger=logger)
    result = trainer.fit()
    assert result.steps == 3
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, accumulate_grad_batches=2, epochs=1), logger=RecordingLogger()
    )
    assert trainer.steps_per_epoch == 4
    assert trainer.global_batch == 64
    assert trainer.fit().steps == 4


def test_a_method_registered_here_trains_with_no_change_to_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toy method, defined and registered in this file, runs 2 steps through the trainer."""
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))

    class ToyConfig(MethodConfig):
        name: Literal["toy"] = "toy"
        width: int = Field(8, ge=1, description="output width of the head")

    @register_method("toy", ToyConfig)
    class Toy(Method):
        """Two views through one linear head; the loss pulls them together."""

        def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head
            self.hook_calls: list[tuple[int, int]] = []

        @classmethod
        def build(cls, config: ToyConfig, backbone: nn.Module) -> Toy:
            return cls(backbone, nn.Linear(backbone.num_features, config.width))

        def embed(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return tuple(self.head(self.backbone(v)) for v in views)

        def loss(self, embeddings: tuple[torch.Tensor, ...]) -> torch.Tensor:
            z_a, z_b = embeddings
            return (2 - 2 * F.cosine_similarity(z_a, z_b)).mean()

        def augmentation(self, image_size: int, **kwargs: Any) -> SimCLRAugment:
            return SimCLRAugment(image_size, generator=kwargs["generator"])

        def after_optimizer_step(self, step: int, total_steps: int) -> None:
            self.hook_calls.append((step, total_steps))

        def log_metrics(self) -> dict[str, Any]:
            return {"method/hook_calls": float(len(self.hook_calls))}

    cfg = tiny_config(tmp_path, max_steps=2, log_every_steps=1)
    cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "method": {"name": "toy", "width": 4}})
    logger = RecordingLogger()
    trainer = Trainer(cfg, logger=logger)
    assert isinstance(trainer.method, Toy) and trainer.method.head.out_features == 4
    before = trainer.method.head.weight.detach().clone()
    result = trainer.fit()
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert trainer.method.hook_calls == [(1, 2), (2, 2)]
    assert not torch.equal(before, trainer.method.head.weight)
    rows = [(step, m["method/hook_calls"]) for step, m in logger.rows if "train/loss" in m]
    assert rows == [(1, 1.0), (2, 2.0)]
    saved = torch.load(Path(cfg.trainer.output_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert saved["trainer"]["step"] == 2 and saved["trainer"]["config"]["method"] == {
        "name": "toy",
        "loss_scale": 1.0,
        "gradient_scale": 1.0,
        "width": 4,
    }


def test_summary_json_holds_the_probes_and_a_random_init_baseline(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    trainer = Trainer(tiny_config(tmp_path, max_steps=3), logger=RecordingLogger(), console=console)
    result = trainer.fit()
    summary = json.loads((Path(trainer.cfg.trainer.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["epochs"] == pytest.approx(3 / 8)
    assert summary["final_loss"] == pytest.approx(result.final_loss)
    assert summary["labels_per_class"] == 10

    def probes_of(method: nn.Module) -> dict[str, float]:
        """Recomputed here from the evaluation functions, outside the trainer."""
        bank, test = eval_datasets(trainer.cfg)
        (x, y), (tx, ty) = (
            encode(method.features, d, trainer.cfg, trainer.device) for d in (bank, test)
        )
        common = {"num_classes": 10}
        return {
            "knn_top1": knn_top1(x, y, tx, ty, k=5, temperature=0.1, **common),
            "linear_top1": linear_probe(x, y, tx, ty, **common),
            "linear_top1_few_labels": linear_probe(x, y, tx, ty, labels_per_class=10, **common),
        }

    trained = probes_of(trainer.method)
    assert {k: summary[k] for k in trained} == pytest.approx(trained)
    random_init = probes_of(trainer.initial_method())
    assert {k: summary["baseline"][k] for k in random_init} == pytest.approx(random_init)
    assert trained != random_init
    text = console.export_text()
    assert "random init" in text and "gain" in text
    gain = 100 * (trained["linear_top1"] - random_init["linear_top1"])
    assert f"{gain:+.2f}" in text


def test_an_unfinished_run_writes_a_summary_without_probes(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path), logger=RecordingLogger())
    trainer.fit(stop_at_step=2)
    summary = json.loads((Path(trainer.cfg.trainer.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["baseline"] is None
    assert summary["linear_top1"] is None and summary["knn_top1"] is None


def test_accumulation_uses_every_micro_batch_of_an_epoch(tmp_path: Path) -> None:
    """8 micro-batches per epoch, 3 per step: steps of 3, 3 and 2, nothing dropped."""
    trainer = Trainer(
        tiny_config(tmp_path, accumulate_grad_batches=3, epochs=2), logger=RecordingLogger()
    )
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6
    assert [trainer.micro_batches_of(s) for s in range(1, 7)] == [3, 3, 2, 3, 3, 2]
    seen = []
    augment = trainer.augment
    trainer.augment = lambda images: seen.append(len(images)) or augment(images)
    result = trainer.fit()
    assert seen == [32] * 16  # both epochs' 256 images, in micro-batches of 32
    assert trainer.loader.state_dict()["position"] == 8
    assert result.steps == 6


def _folder_config(tmp_path: Path, root: Path, **trainer: Any) -> ExperimentConfig:
    cfg = tiny_config(tmp_path, **trainer).to_dict()
    cfg["data"] = {"name": "imagefolder", "root": str(root), "batch_size": 8, "image_size": 32}
    return ExperimentConfig.from_dict(cfg)


def test_an_unlabelled_folder_of_mixed_jpegs_trains(tmp_path: Path) -> None:
    root = unlabelled_folder(tmp_path / "images", count=40)
    console = Console(record=True, width=120)
    trainer = Trainer(
        _folder_config(tmp_path, root, max_steps=5), logger=RecordingLogger(), console=console
    )
    assert trainer.steps_per_epoch == 5
    result = trainer.fit()
    assert result.steps == 5 and torch.isfinite(torch.tensor(result.final_loss))
    assert "kNN monitor and probes skipped: the data has no labels" in console.export_text()
    summary = json.loads((Path(trainer.cfg.trainer.output_dir) / "summary.json").read_text())
    assert summary["knn_top1"] is None and summary["baseline"] is None


def test_a_labelled_folder_resumes_mid_epoch_bit_identically(tmp_path: Path) -> None:
    root = tmp_path / "labelled"
    for i in range(24):
        _jpeg(root / f"class{i % 2}" / f"{i}.jpg", 30 + i, 50 - i, seed=i)
    straight = Trainer(_folder_config(tmp_path / "a", root, max_steps=4), logger=RecordingLogger())
    straight_result = straight.fit()
    assert straight_result.probes is not None  # labelled: the kNN and probes ran
    cfg = _folder_config(tmp_path / "b", root, max_steps=4)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=1)  # mid-epoch (2 steps each)
    resumed = Trainer(
        cfg, resume=Path(cfg.trainer.output_dir) / "checkpoints/last.pt", logger=RecordingLogger()
    )
    resumed.fit()
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
