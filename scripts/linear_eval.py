"""Linear probe on frozen features of a pretrained run: top-1 with all labels and with few.

    python scripts/linear_eval.py runs/simclr_lars [--labels-per-class 10] [--checkpoint PATH]

Reads the run's ``config.yaml`` and last checkpoint, encodes the labelled train and test
splits with the backbone, and trains a logistic-regression probe on the features. Exit 2 on a
missing or mismatched run directory or checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from optim import ConfigError
from ssl_toolkit.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
)
from ssl_toolkit.cli import USAGE_ERRORS, print_error
from ssl_toolkit.config import load_config
from ssl_toolkit.distributed import DEVICES, resolve_device
from ssl_toolkit.evaluation import encode, eval_datasets, knn_top1, linear_probe
from ssl_toolkit.methods import build_method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by pretrain.py")
    parser.add_argument("--checkpoint", type=Path, help=f"default: RUN_DIR/{LAST_CHECKPOINT}")
    parser.add_argument("--labels-per-class", type=int, default=10, help="the few-label probe")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    args = parser.parse_args(argv)
    console = Console()
    try:
        if not (args.run_dir / "config.yaml").is_file():
            raise ConfigError([f"{args.run_dir}: no config.yaml, not a run directory"])
        cfg = load_config(str(args.run_dir / "config.yaml"))
        checkpoint = args.checkpoint or checkpoint_path(args.run_dir)
        state = load_checkpoint(checkpoint)
        method = build_method(cfg)
        try:
            method.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {checkpoint} does not match {args.run_dir}") from err
        device = resolve_device(args.device)
        method.to(device).eval()
        (train, train_y), (test, test_y) = (
            encode(method.embed, dataset, cfg, device) for dataset in eval_datasets(cfg)
        )
    except USAGE_ERRORS as err:
        print_error(err, Console(stderr=True))
        return 2
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    table = Table(title=f"{args.run_dir} at step {state['step']}")
    table.add_column("evaluation")
    table.add_column("top-1", justify="right")
    rows = {
        f"kNN (k={cfg.eval.knn_k})": knn_top1(
            train,
            train_y,
            test,
            test_y,
            k=cfg.eval.knn_k,
            temperature=cfg.eval.knn_temperature,
            num_classes=num_classes,
        ),
        "linear probe, all labels": linear_probe(
            train, train_y, test, test_y, num_classes=num_classes
        ),
        f"linear probe, {args.labels_per_class} labels per class": linear_probe(
            train,
            train_y,
            test,
            test_y,
            num_classes=num_classes,
            labels_per_class=args.labels_per_class,
        ),
    }
    for name, top1 in rows.items():
        table.add_row(name, f"{100 * top1:.2f}%")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
