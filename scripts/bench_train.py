"""Benchmark a SimCLR training step on CPU and show where the time goes.

Same run, same ResNet-18 SimCLR model at 32 px on the digits data, batch 128:

- this trainer: in-memory batches, batched ``SimCLRAugment``, this LARS (the CPU default), and
  the trust ratios moved to the host in one transfer (done every step here, every
  ``logging.trust_ratio_every`` steps in training); the same with the model and its loss
  compiled, as ``trainer.compile=true`` does (the warm-up step pays the compilation);
- baseline: a per-image ``torchvision.transforms.v2`` pipeline in a 2-worker DataLoader, the
  model stepped by timm's ``Lars``;
- lightly, when installed (``pip install .[bench]``): lightly's ``SimCLRTransform`` per PIL
  image in a 2-worker DataLoader and lightly's ``LARS``, same settings.

Columns are medians over the timed steps: data (batch + augmentation), forward + backward,
optimizer step, logging, and images/s of the whole step. ``--precision bf16`` runs every
row's forward pass under bf16 autocast.

    python scripts/bench_train.py [--steps 10] [--precision bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator

import timm.optim
import torch
from baselines import TwoViewDataset, lightly_two_view, torchvision_pipeline
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from optim import build_optimizer
from ssl_toolkit.config import load_config
from ssl_toolkit.trainer import Trainer
from ssl_toolkit.wandb_logger import trust_ratio_metrics

PHASES = ("data", "forward+backward", "optimizer", "logging")
COMPILED = "this trainer, trainer.compile=true"
BASELINE = "torchvision per-image + timm Lars"
LIGHTLY = "lightly SimCLRTransform per image + lightly LARS"


def time_steps(
    next_views: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    log: Callable[[], object],
    steps: int,
    bf16: bool,
) -> dict[str, float]:
    """Median milliseconds of each phase over ``steps`` steps (after one warm-up step)."""
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        view_a, view_b = next_views()
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(view_a, view_b)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        log()
        t4 = time.perf_counter()
        if step:
            for phase, ms in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                samples[phase].append(ms * 1e3)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    cfg = load_config(
        "simclr_lars",
        [
            "logging.wandb.mode=disabled",
            "trainer.device=cpu",
            "trainer.output_dir=runs/bench",
            # SimCLR's own augmentation, as the torchvision baseline runs it (not the digits one).
            "data.color_strength=1.0",
            "data.augment={}",
            "data.crop_min_scale=0.08",
        ],
    )
    trainer = Trainer(cfg)
    batches = trainer.image_batches()
    ours = time_steps(
        lambda: trainer.augment(next(batches)),
        trainer.method,
        trainer.optimizer,
        lambda: trust_ratio_metrics(trainer.optimizer.trust_ratios(adapted_only=True)),
        args.steps,
        bf16,
    )

    compiled_model = copy.deepcopy(trainer.method)
    compiled_optimizer = build_optimizer(cfg.optim, compiled_model.trainable_module())
    compiled = time_steps(
        lambda: trainer.augment(next(batches)),
        torch.compile(compiled_model),  # what trainer.compile=true does
        compiled_optimizer,
        lambda: trust_ratio_metrics(compiled_optimizer.trust_ratios(adapted_only=True)),
        args.steps,
        bf16,
    )

    baseline_model = copy.deepcopy(trainer.method)
    lars = timm.optim.Lars(
        baseline_model.parameters(), lr=0.15, momentum=0.9, weight_decay=1e-6, trust_coeff=1e-3
    )
    loader = DataLoader(
        TwoViewDataset(trainer.train_set.images, torchvision_pipeline(cfg.data.image_size)),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        persistent_workers=True,
    )
    views = forever(loader)
    baseline = time_steps(lambda: next(views), baseline_model, lars, lambda: None, args.steps, bf16)
    rows = {"this trainer": ours, COMPILED: compiled, BASELINE: baseline}
    lightly_set = lightly_two_view(trainer.train_set.images, cfg.data.image_size)
    if lightly_set is not None:
        from lightly.utils.lars import LARS as LightlyLARS

        lightly_model = copy.deepcopy(trainer.method)
        lightly_lars = LightlyLARS(
            lightly_model.parameters(), lr=0.15, momentum=0.9, weight_decay=1e-6
        )
        lightly_views = forever(
            DataLoader(
                lightly_set,
                batch_size=cfg.data.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=2,
                persistent_workers=True,
            )
        )
        rows[LIGHTLY] = time_steps(
            lambda: next(lightly_views), lightly_model, lightly_lars, lambda: None, args.steps, bf16
        )

    title = f"SimCLR ResNet-18, 32 px, batch {cfg.data.batch_size}, {args.precision}, CPU"
    table = Table(title=f"{title}, ms per step")
    table.add_column("pipeline")
    for column in (*PHASES, "images/s"):
        table.add_column(column, justify="right")
    speeds = {}
    for name, phases in rows.items():
        speeds[name] = cfg.data.batch_size / (sum(phases.values()) / 1e3)
        table.add_row(name, *(f"{phases[p]:.1f}" for p in PHASES), f"{speeds[name]:.0f}")
    console = Console(width=120)
    console.print(table)
    for ours_name in ("this trainer", COMPILED):
        for name in (BASELINE, LIGHTLY):
            if name in speeds:
                ratio = speeds[ours_name] / speeds[name]
                console.print(f"{ours_name} / {name} images/s: {ratio:.2f}x")
    for name in (BASELINE, LIGHTLY):
        if name in rows:
            # The forward and backward pass is the same model's on every row: even with data,
            # optimizer and logging free, this trainer could not beat this ratio.
            ceiling = sum(rows[name].values()) / rows["this trainer"]["forward+backward"]
            console.print(
                f"ceiling for this trainer / {name} (forward+backward only): {ceiling:.2f}x"
            )


if __name__ == "__main__":
    main()
