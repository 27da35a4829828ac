"""``pretrain``: the command line of a pretraining run.

    python scripts/pretrain.py --config simclr_lars [--dry-run] [--resume auto|PATH] [key=value ...]

Exit codes: 0 success, 2 any config, usage, data or checkpoint error (one message naming the
key or file, no traceback), 1 a failure while training (a divergence is one line too), 143 or
130 after SIGTERM or SIGINT, with a checkpoint at the last finished step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from rich.console import Console

from optim import ConfigError, name_parameters, render_param_table, resolve_params
from ssl_toolkit.checkpoint import LAST_CHECKPOINT, CheckpointError
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.data import DatasetNotFoundError
from ssl_toolkit.distributed import (
    DeviceUnavailableError,
    cleanup_distributed,
    is_main_process,
)
from ssl_toolkit.health import Diverged
from ssl_toolkit.methods import build_method
from ssl_toolkit.preemption import Preempted
from ssl_toolkit.run_lock import RunDirectoryError
from ssl_toolkit.trainer import Trainer

__all__ = ["USAGE_ERRORS", "main", "print_error"]

USAGE_ERRORS = (
    ConfigError,
    CheckpointError,
    DatasetNotFoundError,
    DeviceUnavailableError,
    RunDirectoryError,
)
"""Errors of the user's input: exit code 2 and one ``error:`` line per problem."""


def print_error(error: Exception, console: Console) -> None:
    """Print one ``error: ...`` line per line of ``error``: no markup, no emoji codes (a shard
    key ``x`` would print ``SHARD:x:`` as a cross), no traceback, and no line breaks added at
    the terminal's width."""
    for line in str(error).splitlines():
        console.print(f"error: {line}", markup=False, highlight=False, emoji=False, soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Self-supervised pretraining from a YAML config.",
        epilog="Overrides are dotted keys with YAML values, e.g. optim.lr=0.5 "
        "trainer.max_steps=100 'optim.exclude_from_layer_adaptation=[@norm,@bias]'.",
    )
    parser.add_argument(
        "--config", required=True, help="a YAML path, or a bare name looked up in configs/"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the parameter-rule table, then exit",
    )
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help=f"continue from a checkpoint; 'auto' uses <output_dir>/{LAST_CHECKPOINT} if present "
        "(or, if that is corrupt, the newest good step checkpoint)",
    )
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    return parser


def _resume(resume: str | None) -> Path | str | None:
    """``--resume``: ``auto`` as it is (the trainer finds the newest good checkpoint), or a
    path that must exist."""
    if resume is None or resume == "auto":
        return resume
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume: checkpoint {path} does not exist")
    return path


def dry_run(cfg: ExperimentConfig, console: Console) -> None:
    """Print the resolved config and which rule each parameter matched."""
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", markup=False)
    module = build_method(cfg.method, **cfg.model.backbone_options()).trainable_module()
    name_parameters(module)
    console.print(render_param_table(resolve_params(module, cfg.optim)))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_intermixed_args(argv)
    out, err = Console(), Console(stderr=True)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg, Console(width=160))
            return 0
        trainer = Trainer(cfg, resume=_resume(args.resume), console=err)
        trainer.fit()
        cleanup_distributed(sync=True)
        if trainer.ctx.is_main:
            out.print(f"run directory: {cfg.trainer.output_dir}", soft_wrap=True)
        return 0
    except USAGE_ERRORS as error:
        print_error(error, err)
        return 2
    except Preempted as stop:
        if is_main_process():
            err.print(str(stop), markup=False, highlight=False, soft_wrap=True)
        return stop.exit_code
    except Diverged as error:
        if is_main_process():
            print_error(error, err)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception:
        err.print_exception(max_frames=5)
        err.print("error: training failed (see above)")
        return 1
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
