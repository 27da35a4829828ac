"""Two gloo processes against one: SyncBN, sharded kNN, per-rank resume, logging, FSDP2 + LARS,
exact accumulation."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models.heads import ScaleBatchNorm1d
from optim import build_optimizer
from optim.op_count import count_ops
from ssl_toolkit.accumulation import accumulate
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.distributed import cleanup_distributed, setup_distributed
from ssl_toolkit.evaluation import Evaluator, shard_dataset
from ssl_toolkit.knn import knn_correct
from ssl_toolkit.parallel import parallelize
from ssl_toolkit.sync_batch_norm import CPUSyncBatchNorm, convert_sync_batchnorm
from ssl_toolkit.trainer import Trainer, _LogWindow
from tests.ssl_toolkit.test_accumulation import _assert_same_grads, _method, _micro_batches
from tests.ssl_toolkit.test_knn import knn_reference, tied_bank

WORLD = 2
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(rank: int, port: int, out_dir: str, job: Callable[[int, Path], Any]) -> None:
    """Join a 2-process gloo group, run ``job(rank, out_dir)``, save what it returns."""
    _join(rank, port)
    setup_distributed("cpu", timedelta(minutes=2))  # a rank left waiting fails the test soon
    try:
        result = job(rank, Path(out_dir))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        cleanup_distributed()
        raise
    cleanup_distributed(sync=True)


def _on_one_core(rank: int, worker: Callable[..., None], *args: Any) -> None:
    torch.set_num_threads(1)  # as torchrun gives each rank: 2 ranks of 2 threads thrash 2 cores
    worker(rank, *args)


def start_ranks(worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Run ``worker(rank, *args)`` in ``WORLD`` new processes of one thread each, and wait
    for them all.

    Spawned, not forked: other tests may have left threads (e.g. W&B's) running in this
    process."""
    mp.spawn(_on_one_core, args=(worker, *args), nprocs=WORLD, join=True)


def _spawn(job: Callable[[int, Path], Any], out_dir: Path) -> list[Any]:
    start_ranks(_worker, (_free_port(), str(out_dir), job))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# --- SyncBN -------------------------------------------------------------------------------


def _bn_model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 5),
        ScaleBatchNorm1d(5),  # SimCLR's head: a scale, no shift
        nn.Linear(5, 5),
        nn.BatchNorm1d(5, affine=False),  # MoCo v3's head: neither
    ).double()
    return convert_sync_batchnorm(model, torch.device("cpu")) if sync else model


def _bn_batch() -> torch.Tensor:
    return torch.randn(
        2 * WORLD, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )


def _bn_step(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    out = model(images)
    out.square().sum(dim=1).mean().backward()
    module = model.module if hasattr(model, "module") else model
    return {
        "out": out.detach(),
        "grads": {n: p.grad.clone() for n, p in module.named_parameters()},
        "buffers": {n: b.clone() for n, b in module.named_buffers()},
    }


def _sync_bn_job(rank: int, out_dir: Path) -> dict[str, Any]:
    rows = _bn_batch().chunk(WORLD)[rank]
    return {
        sync: _bn_step(nn.parallel.DistributedDataParallel(_bn_model(sync)), rows)
        for sync in (True, False)
    }


def test_sync_bn_two_processes_equal_one_on_the_joined_batch(tmp_path: Path) -> None:
    ranks = _spawn(_sync_bn_job, tmp_path)
    assert any(isinstance(m, CPUSyncBatchNorm) for m in _bn_model(True).modules())
    reference = _bn_step(_bn_model(False), _bn_batch())
    joined = torch.cat([r[True]["out"] for r in ranks])
    torch.testing.assert_close(joined, reference["out"], rtol=1e-10, atol=1e-12)
    for result in ranks:
        for kind in ("grads", "buffers"):
            for name, value in result[True][kind].items():
                torch.testing.assert_close(
                    value, reference[kind][name], rtol=1e-10, atol=1e-12, msg=name
                )
    # The comparison is sensitive: per-rank statistics change the outputs.
    unsynced = torch.cat([r[False]["out"] for r in ranks])
    assert not torch.allclose(unsynced, reference["out"])


# --- sharded kNN ------------------------------------------------------------------------


_KNN_VARIANTS = {
    "fp32": {},
    "fp16": {"bank_dtype": "fp16"},
    "capped": {"knn_bank_size": 200},
}


def _knn_config(**eval_keys: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "optim": {"name": "lars", "lr": 1.0},
            "data": {"name": "digits", "num_workers": 0},
            "eval": {"knn_k": 7, "batch_size": 100, **eval_keys},
        }
    )


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Flatten()).eval()


def _monitor(rank: int, **eval_keys: Any) -> Evaluator:
    return Evaluator(
        _knn_config(**eval_keys),
        steps_per_epoch=1,
        total_steps=1,
        device=torch.device("cpu"),
        rank=rank,
        world_size=WORLD,
    )


def _tied_split(rank: int) -> tuple[torch.Tensor, ...]:
    """Rank 0 holds 3 bank rows (fewer than k) and no query; rank 1 the rest."""
    bank, bank_labels = tied_bank(50, seed=7)
    queries, query_labels = tied_bank(30, seed=8)
    cut, share = (slice(0, 3), slice(0, 0)) if rank == 0 else (slice(3, 50), slice(0, 30))
    return bank[cut], bank_labels[cut], queries[share], query_labels[share]


def _knn_job(rank: int, out_dir: Path) -> dict[str, Any]:
    monitors = {name: _monitor(rank, **keys) for name, keys in _KNN_VARIANTS.items()}
    tied = {
        dtype: knn_correct(
            *(x.to(dtype) if x.is_floating_point() else x for x in _tied_split(rank)),
            k=5,
            num_classes=4,
            sharded=True,
        ).item()
        for dtype in (torch.float32, torch.float16)
    }
    return {"monitor": {n: m.knn_top1(_encoder()) for n, m in monitors.items()}, "tied": tied}


def test_sharded_knn_equals_one_process(tmp_path: Path) -> None:
    """Digits: 1437 bank and 360 test images, so the bank shards need padding; fp16 and a
    capped bank too. A bank of three directions, where similarities tie in large groups, split
    so that one rank has fewer bank rows than k and no query."""
    ranks = _spawn(_knn_job, tmp_path)
    expected = {
        name: Evaluator(
            _knn_config(**keys), steps_per_epoch=1, total_steps=1, device="cpu"
        ).knn_top1(_encoder())
        for name, keys in _KNN_VARIANTS.items()
    }
    assert [r["monitor"] for r in ranks] == [expected, expected]
    assert 0.3 < expected["fp32"] < 1.0 and expected["capped"] != expected["fp32"]
    bank, bank_labels = tied_bank(50, seed=7)
    queries, query_labels = tied_bank(30, seed=8)
    common = {"k": 5, "temperature": 0.1, "num_classes": 4}
    single = knn_correct(bank, bank_labels, queries, query_labels, **common).item()
    assert single == knn_reference(bank, bank_labels, queries, query_labels, **common)
    assert [r["tied"] for r in ranks] == [{torch.float32: single, torch.float16: single}] * 2


class _FailsOnRank1(nn.Module):
    """An encoder whose second process cannot encode (an image of its shard is broken)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.distributed.get_rank() == 1:
            raise ValueError("rank 1's shard holds an image that does not decode")
        return images.flatten(1).float()


def _failing_knn_job(rank: int, out_dir: Path) -> str:
    try:
        _monitor(rank).knn_top1(_FailsOnRank1())
    except ValueError as error:
        return str(error)
    return "no error"


def test_an_evaluation_error_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    """The failing rank must not leave the other waiting in the gather of bank features."""
    assert (
        _spawn(_failing_knn_job, tmp_path)
        == ["rank 1's shard holds an image that does not decode"] * 2
    )


def test_shards_are_padded_to_one_length_and_cover_the_dataset() -> None:
    data = list(range(11))
    shards = [shard_dataset(data, rank, 4) for rank in range(4)]
    assert [len(s) for s, _ in shards] == [3, 3, 3, 3]
    assert [real for _, real in shards] == [3, 3, 3, 2]
    assert [x for shard, real in shards for x in list(shard)[:real]] == data
    assert list(shards[3][0]) == [9, 10, 10]


# --- per-rank state, resume, logging ----------------------------------------------------


class _Rows:
    """A logger double on every rank (the real logger writes from the main rank only)."""

    run_id = "rows"

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.rows.append(
            (step, {k: float(v) for k, v in metrics.items() if k != "train/img_per_s"})
        )

    def log_trust_ratios(self, ratios: dict[str, torch.Tensor], step: int) -> None:
        """Not recorded."""

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Not recorded."""

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """Not recorded."""

    def finish(self) -> None:
        """Nothing to close."""


def _trainer_config(out: Path, strategy: str = "ddp") -> ExperimentConfig:
    """timm's test ResNet on 256 synthetic images, 32 per process: 4 steps per epoch."""
    return ExperimentConfig.from_dict(
        {
            "method": {
                "name": "byol",
                "projector": {"hidden_dim": 32, "out_dim": 16},
                "predictor": {"hidden_dim": 32, "out_dim": 16},
            },
            "model": {"backbone": "timm/test_resnet"},
            "data": {"name": "synthetic", "batch_size": 32, "num_workers": 0},
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
                "strategy": strategy,
                "output_dir": str(out),
                "log_every_steps": 1,
            },
            "logging": {"wandb": {"mode": "disabled"}},
            "eval": {"every_epochs": 1, "knn_k": 5, "batch_size": 128, "baseline": False},
        }
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.checkpointer.state_dict()  # collective: every rank calls it
    return state["model"] if trainer.ctx.is_main else {}


def _run_then_stop(strategy: str, rank: int, out_dir: Path) -> dict[str, Any]:
    """The uninterrupted run, and a run stopped after the checkpoint of step 3 (mid-epoch)."""
    straight = Trainer(_trainer_config(out_dir / "straight", strategy), logger=_Rows())
    straight.fit()
    Trainer(_trainer_config(out_dir / "resumed", strategy), logger=_Rows()).fit(stop_at_step=3)
    return {"straight": _weights(straight)}


def _resume(strategy: str, rank: int, out_dir: Path) -> dict[str, Any]:
    """Fresh processes continue the stopped run from its checkpoint."""
    torch.manual_seed(1234 + rank)  # the resumed run must not depend on this process's RNG
    rows = _Rows()
    cfg = _trainer_config(out_dir / "resumed", strategy)
    resumed = Trainer(cfg, resume=out_dir / "resumed/checkpoints/last.pt", logger=rows)
    resumed.fit()
    return {"resumed": _weights(resumed), "rows": rows.rows}


def _stopped_and_resumed(strategy: str, out_dir: Path) -> list[dict[str, Any]]:
    first = _spawn(functools.partial(_run_then_stop, strategy), out_dir)
    second = _spawn(functools.partial(_resume, strategy), out_dir)
    return [{**a, **b} for a, b in zip(first, second, strict=True)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, _stopped_and_resumed("ddp", out)


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp2")
    return out, _stopped_and_resumed("fsdp2", out)


@pytest.mark.parametrize("runs", ["ddp_runs", "fsdp2_runs"])
def test_two_process_resume_ends_bitwise_equal_to_the_uninterrupted_run(
    request: pytest.FixtureRequest, runs: str
) -> None:
    out, ranks = request.getfixturevalue(runs)
    straight, resumed = ranks[0]["straight"], ranks[0]["resumed"]
    assert straight.keys() == resumed.keys() and len(straight) > 20
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    saved = torch.load(out / "resumed/checkpoints/last.pt", weights_only=True)
    assert len(saved["ranks"]) == WORLD
    first, second = (r["augment_generator"] for r in saved["ranks"])
    assert not torch.equal(first, second), "each rank has its own augmentation stream"
    # Logged values are means over ranks: both ranks log the same numbers.
    assert ranks[0]["rows"] == ranks[1]["rows"]
    assert [step for step, m in ranks[0]["rows"] if "train/loss" in m] == [4, 5, 6, 7, 8]


def _with_epochs(cfg: ExperimentConfig, epochs: int) -> ExperimentConfig:
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"epochs": epochs})})


def test_resume_on_fewer_processes_keeps_the_images_seen(ddp_runs) -> None:
    """2 processes x 32 images x 8 steps = 512 images = 16 steps of one process."""
    out, _ = ddp_runs
    cfg = _with_epochs(_trainer_config(out / "resumed"), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, resume=out / "resumed/checkpoints/last.pt", logger=_Rows())
    message = "written by 2 process(es) and this run has 1: it continues at step 16 of 24"
    assert any(message in str(w.message) for w in caught)
    assert trainer.step == 16 and trainer.steps_per_epoch == 8
    assert trainer.fit().steps == 24  # one more epoch: three in all, as the config says


def _resume_single_on_two(rank: int, out_dir: Path) -> dict[str, int]:
    cfg = _trainer_config(out_dir / "single")
    trainer = Trainer(cfg, resume=out_dir / "single/checkpoints/last.pt", logger=_Rows())
    resumed_at = trainer.step
    return {"resumed_at": resumed_at, "total": trainer.total_steps, "end": trainer.fit().steps}


def test_resume_on_more_processes_keeps_the_images_seen(tmp_path: Path) -> None:
    """12 steps x 32 images on one process = 384 images = 6 steps of 2 x 32."""
    Trainer(_trainer_config(tmp_path / "single"), logger=_Rows()).fit(stop_at_step=12)
    ranks = _spawn(_resume_single_on_two, tmp_path)
    assert ranks == [{"resumed_at": 6, "total": 8, "end": 8}] * 2


def _log_window_job(rank: int, out_dir: Path) -> float:
    window = _LogWindow(torch.device("cpu"))
    for step in range(3):
        window.add(torch.tensor(float(rank + step)), images=64)
    return window.flush()[0]


def test_logged_loss_is_the_mean_over_steps_and_ranks(tmp_path: Path) -> None:
    # rank 0 logs steps 0, 1, 2 and rank 1 steps 1, 2, 3: the mean over both is 1.5.
    assert _spawn(_log_window_job, tmp_path) == [1.5, 1.5]


# --- FSDP2 + LARS -----------------------------------------------------------------------

LARS_CFG = {
    "name": "lars",
    "lr": 0.5,
    "weight_decay": 1e-2,
    "exclude_from_layer_adaptation": ["@norm", "@bias"],
    "exclude_from_weight_decay": ["@norm"],
}
LARS_VARIANTS = {
    "original": LARS_CFG,
    "update-ratio-lr-outside": {**LARS_CFG, "trust_ratio": "update", "lr_in_buffer": False},
}


def _lars_model() -> nn.Module:
    # Odd sizes: some shards are uneven, and the 5-row weight splits 3 + 2.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9),
        nn.LayerNorm(9),
        nn.Tanh(),
        nn.Sequential(nn.Linear(9, 5), nn.Linear(5, 3, bias=False)),
    )


def _lars_steps(model: nn.Module, rank: int, world: int, cfg: dict) -> dict[str, Any]:
    optimizer = build_optimizer(cfg, model)
    data = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(1))
    ratios, syncs = [], []
    for batch in data:
        model(batch.chunk(world)[rank]).square().mean().backward()
        syncs.append(count_ops(optimizer.step).syncs)
        optimizer.zero_grad()
        ratios.append({k: v.clone() for k, v in optimizer.trust_ratios().items()})
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }
    return {"params": params, "ratios": ratios, "syncs": syncs}


def _fsdp2_lars_job(rank: int, out_dir: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    results = {}
    for variant, cfg in LARS_VARIANTS.items():
        model = _lars_model()
        fully_shard(model[3])
        fully_shard(model)
        assert type(next(model.parameters())).__name__ == "DTensor"
        results[variant] = _lars_steps(model, rank, WORLD, cfg)
    return results


@pytest.fixture(scope="module")
def fsdp2_lars_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One 2-process FSDP2 run of every variant, shared by the tests that check them."""
    return _spawn(_fsdp2_lars_job, tmp_path_factory.mktemp("fsdp2-lars"))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
def test_fsdp2_lars_equals_the_unsharded_step(
    fsdp2_lars_results: list[dict[str, Any]], variant: str
) -> None:
    """Both LARS variants: the sharded step's ratios and parameters are the unsharded ones."""
    ranks = [result[variant] for result in fsdp2_lars_results]
    reference = _lars_steps(_lars_model(), 0, 1, LARS_VARIANTS[variant])
    adapted = {"0.weight", "3.0.weight", "3.1.weight"}
    for result in ranks:
        assert result["syncs"] == [0, 0, 0]
        for got, want in zip(result["ratios"], reference["ratios"], strict=True):
            assert got.keys() == want.keys()
            assert {n for n, r in want.items() if r.item() != 1.0} == adapted
            for name in want:
                assert _relative(got[name], want[name]) <= 1e-6, name
        for name, value in reference["params"].items():
            assert _relative(result["params"][name], value) <= 1e-6, name
    assert not torch.equal(reference["params"]["1.weight"], _lars_model()[1].weight)


# --- exact accumulation ----------------------------------------------------------------

ACCUMULATED = [("ddp", "simclr"), ("ddp", "byol"), ("ddp", "barlow_twins"), ("fsdp2", "simclr")]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _accumulated(method: nn.Module, micro_batches: list, model: nn.Module) -> dict[str, Any]:
    loss = accumulate(method, micro_batches, exact=True, model=model)
    grads = {n: _full(p.grad) for n, p in method.named_parameters() if p.grad is not None}
    return {"loss": loss, "grads": grads}


def _accumulation_job(rank: int, out_dir: Path) -> dict[str, Any]:
    """Rank r takes micro-batches 2r and 2r + 1 of the four (float64, BatchNorm, no SyncBN)."""
    ctx = setup_distributed("cpu")
    results = {}
    for strategy, name in ACCUMULATED:
        method = _method(name)
        model = parallelize(method, ctx, strategy)
        mine = _micro_batches()[2 * rank : 2 * rank + 2]
        results[f"{strategy}/{name}"] = _accumulated(method, mine, model)
    return results


def test_two_processes_of_two_micro_batches_equal_one_of_four(tmp_path: Path) -> None:
    """The loss of the joined embeddings over micro-batches and processes: DDP and FSDP2
    gradients equal one process accumulating all four micro-batches exactly."""
    ranks = _spawn(_accumulation_job, tmp_path)
    for strategy, name in ACCUMULATED:
        method = _method(name)
        expected = _accumulated(method, _micro_batches(), method)
        key = f"{strategy}/{name}"
        for result in ranks:
            _assert_same_grads(result[key]["grads"], expected["grads"])
        # Each rank's loss is its share (SimCLR's and BYOL's anchors are its own images).
        mean = sum(r[key]["loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean, expected["loss"], rtol=1e-10, atol=0)


def test_torchrun_fsdp2_writes_one_run_and_prints_once(tmp_path: Path) -> None:
    """The real command line under torchrun: one checkpoint, one summary, one run line."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            str(ROOT / "scripts" / "pretrain.py"),
            "--config",
            "simclr_lars",
            "trainer.device=cpu",
            "trainer.strategy=fsdp2",
            "model.backbone=timm/test_resnet",
            "method.projector={hidden_dim: 32, out_dim: 16}",
            "trainer.max_steps=2",
            "trainer.accumulate_grad_batches=2",
            f"trainer.output_dir={out}",
            "logging.wandb.mode=offline",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1
    assert proc.stderr.count("pretraining summary") == 1
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step-00000002.pt"]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
