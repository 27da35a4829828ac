"""Evaluate the frozen backbone of a pretrained run: kNN and linear probes, or the papers'
SGD linear evaluation.

    python scripts/linear_eval.py runs/simclr_lars [--labels-per-class 10] [--checkpoint PATH]
    python scripts/linear_eval.py runs/imagenet_simclr --protocol sgd [--epochs 90]

Reads the run's ``config.yaml`` and last checkpoint and evaluates on the labelled splits of
``data`` (or ``eval.root``). ``--protocol probe`` (the default, seconds): weighted kNN and
L-BFGS logistic regression on un-augmented, L2-normalised features, with all labels and with
``--labels-per-class``, as in the run's ``summary.json``. ``--protocol sgd`` (the papers'
numbers, much longer): a linear classifier trained with SGD, Nesterov momentum and a cosine
schedule on random-resized-crop and flip views for ``--epochs`` epochs. Exit 2 on a missing or
mismatched run directory or checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from optim import ConfigError
from ssl_toolkit.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
)
from ssl_toolkit.cli import USAGE_ERRORS, print_error
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.distributed import DEVICES, resolve_device
from ssl_toolkit.evaluation import Evaluator, linear_eval_sgd
from ssl_toolkit.methods import Method, build_method


def _probes(method: Method, cfg: ExperimentConfig, device: torch.device) -> dict[str, float]:
    """The run's own end-of-run probes (``Evaluator.probes``), as in its ``summary.json``."""
    evaluator = Evaluator(cfg, steps_per_epoch=1, total_steps=1, device=device)
    if not evaluator.enabled:
        raise ConfigError(["eval.root: the data has no labels; set eval.root=LABELLED_FOLDER"])
    probes = evaluator.probes(method.features)
    return {
        f"kNN (k={cfg.eval.knn_k})": probes.knn_top1,
        "linear probe (L-BFGS), all labels": probes.linear_top1,
        f"linear probe (L-BFGS), {probes.labels_per_class} labels per class": (
            probes.linear_top1_few_labels
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by pretrain.py")
    parser.add_argument("--checkpoint", type=Path, help=f"default: RUN_DIR/{LAST_CHECKPOINT}")
    parser.add_argument("--protocol", choices=["probe", "sgd"], default="probe")
    parser.add_argument(
        "--labels-per-class", type=int, help="the few-label probe (default: the run's config)"
    )
    parser.add_argument("--epochs", type=int, default=90, help="sgd: epochs (the papers: 90)")
    parser.add_argument("--batch-size", type=int, default=256, help="sgd: batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="sgd: lr per 256 images")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    args = parser.parse_args(argv)
    console = Console()
    try:
        if not (args.run_dir / "config.yaml").is_file():
            raise ConfigError([f"{args.run_dir}: no config.yaml, not a run directory"])
        few = [f"eval.labels_per_class={args.labels_per_class}"] if args.labels_per_class else []
        cfg = load_config(str(args.run_dir / "config.yaml"), few)
        checkpoint = args.checkpoint or checkpoint_path(args.run_dir)
        state = load_checkpoint(checkpoint)
        method = build_method(cfg.method, **cfg.model.backbone_options())
        try:
            method.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {checkpoint} does not match {args.run_dir}") from err
        device = resolve_device(args.device)
        method.to(device).eval()
        if args.protocol == "probe":
            rows = _probes(method, cfg, device)
        else:
            with Progress(console=console) as progress:
                task = progress.add_task("linear evaluation (SGD)", total=args.epochs)
                top1 = linear_eval_sgd(
                    method.features,
                    cfg,
                    device,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    progress=lambda epoch, loss: progress.update(task, completed=epoch),
                )
            rows = {f"linear (SGD, {args.epochs} epochs, crops and flips)": top1}
    except USAGE_ERRORS as err:
        print_error(err, Console(stderr=True))
        return 2
    table = Table(title=f"{args.run_dir} at step {state.get('trainer', state).get('step')}")
    table.add_column("evaluation")
    table.add_column("top-1", justify="right")
    for name, top1 in rows.items():
        table.add_row(name, f"{100 * top1:.2f}%")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
