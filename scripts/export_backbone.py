"""Export the backbone of a pretraining run as a plain state dict.

    python scripts/export_backbone.py RUN_DIR [--out PATH] [--checkpoint PATH]

Writes ``RUN_DIR/backbone.pt`` (or ``--out``) from the run's newest loadable checkpoint (or
``--checkpoint``). Load it in another project with ``load_state_dict(..., strict=True)`` into
``models.build_backbone(name, cifar_stem=...)``, or for a plain backbone into
``torchvision.models.<name>()`` with ``fc = torch.nn.Identity()`` or
``timm.create_model(name, num_classes=0)``. Exit 2 on a missing or broken checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ssl_toolkit.cli import USAGE_ERRORS, print_error
from ssl_toolkit.export import export_backbone


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by pretrain.py")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/backbone.pt")
    parser.add_argument(
        "--checkpoint", type=Path, help="default: the run's newest loadable checkpoint"
    )
    args = parser.parse_args(argv)
    try:
        path = export_backbone(args.run_dir, args.out, args.checkpoint)
    except (*USAGE_ERRORS, ValueError) as err:
        print_error(err, Console(stderr=True))
        return 2
    Console().print(f"backbone written to {path}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
