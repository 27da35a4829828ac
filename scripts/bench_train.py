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

A second table prices exact gradient accumulation (``trainer.accumulation=exact``: one loss
over all micro-batches of a step, at the cost of one more forward pass) against independent
accumulation (one loss per micro-batch): the same model, 4 micro-batches of the batch above
per optimizer step, both modes on identical copies of the model, each with its own optimizer,
taking turns step by step. Its columns are the median milliseconds of a whole optimizer step
(data, forward + backward, optimizer step and ``zero_grad``) and images/s; the ratio of the
two step times follows. ``--only pipelines`` or ``--only accumulation`` runs one table.

    python scripts/bench_train.py [--steps 10] [--precision bf16] [--only accumulation]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import timm.optim
import torch
from baselines import TwoViewDataset, lightly_two_view, torchvision_pipeline
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from optim import build_optimizer
from ssl_toolkit.accumulation import accumulate
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.methods import Method
from ssl_toolkit.trainer import Trainer
from ssl_toolkit.wandb_logger import trust_ratio_metrics

PHASES = ("data", "forward+backward", "optimizer", "logging")
STEP = "step"
"""The whole step, whose median is not the sum of the phases' medians."""
MICRO_BATCHES = 4
"""Micro-batches per optimizer step in the accumulation table."""
COMPILED = "this trainer, trainer.compile=true"
BASELINE = "torchvision per-image + timm Lars"
LIGHTLY = "lightly SimCLRTransform per image + lightly LARS"


def timed_step(
    next_micro_batches: Callable[[], list[Sequence[torch.Tensor]]],
    method: Method,
    optimizer: torch.optim.Optimizer,
    log: Callable[[], object],
    bf16: bool,
    *,
    model: torch.nn.Module | None = None,
    exact: bool = False,
) -> dict[str, float]:
    """Milliseconds of each phase of one optimizer step, and of the whole step (``STEP``).

    The forward and backward pass is the trainer's :func:`accumulate` over the step's
    micro-batches (``exact`` or independent); ``model`` is what it calls for the embeddings
    (default ``method``; ``torch.compile`` of it for the compiled row).
    """
    t0 = time.perf_counter()
    micro_batches = next_micro_batches()
    t1 = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    accumulate(method, micro_batches, exact=exact, model=model, autocast=autocast)
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    log()
    t4 = time.perf_counter()
    times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)
    return {phase: seconds * 1e3 for phase, seconds in zip((*PHASES, STEP), times)}


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase over the timed steps."""
    return {phase: statistics.median(s[phase] for s in samples) for phase in samples[0]}


def time_steps(step: Callable[[], dict[str, float]], steps: int) -> dict[str, float]:
    """Median milliseconds of each phase of ``step`` over ``steps`` steps after one warm-up
    step (which pays one-off costs: allocations, compilation)."""
    step()
    return medians([step() for _ in range(steps)])


def forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--only", choices=("pipelines", "accumulation"), help="run one table (default both)"
    )
    args = parser.parse_args()
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
    console = Console(width=120)
    if args.only != "accumulation":
        bench_pipelines(trainer, cfg, args.steps, args.precision, console)
    if args.only != "pipelines":
        bench_accumulation(trainer, cfg, args.steps, args.precision, console)


def bench_pipelines(
    trainer: Trainer, cfg: ExperimentConfig, steps: int, precision: str, console: Console
) -> None:
    """The table of this trainer's step against the per-image baselines, and their ratios."""
    bf16 = precision == "bf16"
    batches = trainer.image_batches()
    ours = time_steps(
        partial(
            timed_step,
            lambda: [trainer.augment(next(batches))],
            trainer.method,
            trainer.optimizer,
            lambda: trust_ratio_metrics(trainer.optimizer.trust_ratios(adapted_only=True)),
            bf16,
        ),
        steps,
    )

    compiled_model = copy.deepcopy(trainer.method)
    compiled_optimizer = build_optimizer(cfg.optim, compiled_model.trainable_module())
    compiled = time_steps(
        partial(
            timed_step,
            lambda: [trainer.augment(next(batches))],
            compiled_model,
            compiled_optimizer,
            lambda: trust_ratio_metrics(compiled_optimizer.trust_ratios(adapted_only=True)),
            bf16,
            model=torch.compile(compiled_model),  # what trainer.compile=true does
        ),
        steps,
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
    baseline = time_steps(
        partial(timed_step, lambda: [next(views)], baseline_model, lars, lambda: None, bf16), steps
    )
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
            partial(
                timed_step,
                lambda: [next(lightly_views)],
                lightly_model,
                lightly_lars,
                lambda: None,
                bf16,
            ),
            steps,
        )

    title = f"SimCLR ResNet-18, 32 px, batch {cfg.data.batch_size}, {precision}, CPU"
    table = Table(title=f"{title}, ms per step")
    table.add_column("pipeline")
    for column in (*PHASES, "images/s"):
        table.add_column(column, justify="right")
    # A step's time here is the sum of its phases' medians, so that the columns add up.
    step_ms = {name: sum(phases[p] for p in PHASES) for name, phases in rows.items()}
    speeds = {}
    for name, phases in rows.items():
        speeds[name] = cfg.data.batch_size / (step_ms[name] / 1e3)
        table.add_row(name, *(f"{phases[p]:.1f}" for p in PHASES), f"{speeds[name]:.0f}")
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
            ceiling = step_ms[name] / rows["this trainer"]["forward+backward"]
            console.print(
                f"ceiling for this trainer / {name} (forward+backward only): {ceiling:.2f}x"
            )


def bench_accumulation(
    trainer: Trainer, cfg: ExperimentConfig, steps: int, precision: str, console: Console
) -> None:
    """Exact against independent accumulation over ``MICRO_BATCHES`` micro-batches: what
    exact's one loss over the whole step costs (its extra forward pass), on identical models.

    The two modes take turns, one step each, so that a load that comes and goes on a shared
    CPU weighs on both alike.
    """
    batches = trainer.image_batches()
    modes = {}
    for mode in ("independent", "exact"):
        model = copy.deepcopy(trainer.method)
        modes[mode] = partial(
            timed_step,
            lambda: [trainer.views_of(next(batches)) for _ in range(MICRO_BATCHES)],
            model,
            build_optimizer(cfg.optim, model.trainable_module()),
            lambda: None,
            precision == "bf16",
            exact=mode == "exact",
        )
    for step in modes.values():
        step()  # warm-up
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(steps):
        for mode, step in modes.items():
            samples[mode].append(step())
    step_ms = {mode: medians(samples[mode])[STEP] for mode in modes}

    images = MICRO_BATCHES * cfg.data.batch_size
    title = (
        f"SimCLR ResNet-18, 32 px, {MICRO_BATCHES} micro-batches of {cfg.data.batch_size} "
        f"({images} images) per optimizer step, {precision}, CPU"
    )
    table = Table(title=title, min_width=len(title))  # a title on one line
    table.add_column("mode")
    table.add_column("ms per step", justify="right")
    table.add_column("images/s", justify="right")
    for mode, ms in step_ms.items():
        table.add_row(mode, f"{ms:.1f}", f"{images / (ms / 1e3):.0f}")
    console.print(table)
    ratio = step_ms["exact"] / step_ms["independent"]
    console.print(f"exact / independent step time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
