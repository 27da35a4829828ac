"""Benchmark one optimizer step: this LARS (each path) against the usual alternatives.

Rows: this LARS (single-tensor, multi-tensor, fused), a straightforward per-parameter LARS that
follows the original (a Python ``if`` on the norms), timm's ``Lars`` (single-tensor and foreach)
and torch SGD foreach, all on the same parameter set in one run. Columns: aten ops per step and
host syncs per step (counted, deterministic), median milliseconds per step, and the ratio of
that median to SGD foreach's. CPU always; CUDA too when a GPU is present.

    python scripts/bench_optim.py            # ResNet-50 and ViT-B/16 parameter sets
    python scripts/bench_optim.py --quick    # ResNet-50 only, fewer repeats (under a minute)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import timm.optim
import torch
import torchvision
from baselines import PerParameterLARS
from rich.console import Console
from rich.table import Table
from torch import nn

from optim import LARS
from optim.op_count import count_ops


def parameter_set(name: str, device: torch.device) -> list[nn.Parameter]:
    """The parameters of a real model on ``device``, named, with random gradients."""
    if name == "resnet50":
        model = torchvision.models.resnet50()
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    gen = torch.Generator().manual_seed(0)
    params = []
    for param_name, p in model.named_parameters():
        param = nn.Parameter(p.detach().to(device))
        param.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        param.param_name = param_name
        params.append(param)
    return params


def excluded(params: list[nn.Parameter]) -> dict[str, set[str]]:
    """The usual SSL exclusions: norms and biases (here the 1-d tensors) keep ratio 1 and get
    no weight decay."""
    names = {p.param_name for p in params if p.ndim <= 1}
    return {"exclude_from_layer_adaptation": names, "exclude_from_weight_decay": names}


# The variant of BYOL's, Barlow Twins', VICReg's and MoCo v3's code (docs/lars.md).
AUTHORS_VARIANT = {"trust_ratio": "update", "lr_in_buffer": False}


def optimizers(lr: float = 0.1, wd: float = 1e-6) -> dict[str, Callable]:
    common = dict(lr=lr, momentum=0.9, weight_decay=wd)
    return {
        "LARS default (foreach=None)": lambda ps: LARS(ps, **common),
        "LARS single-tensor": lambda ps: LARS(ps, **common, foreach=False),
        "LARS multi-tensor": lambda ps: LARS(ps, **common, foreach=True),
        "LARS multi-tensor, norms/biases excluded": lambda ps: LARS(
            ps, **common, **excluded(ps), foreach=True
        ),
        "LARS multi-tensor, update ratio, lr outside, excluded": lambda ps: LARS(
            ps, **common, **excluded(ps), **AUTHORS_VARIANT, foreach=True
        ),
        "LARS single-tensor, update ratio, lr outside, excluded": lambda ps: LARS(
            ps, **common, **excluded(ps), **AUTHORS_VARIANT, foreach=False
        ),
        "LARS fused (compiled)": lambda ps: LARS(ps, **common, fused=True),
        "per-parameter LARS (original style)": lambda ps: PerParameterLARS(ps, **common),
        "timm Lars single-tensor": lambda ps: timm.optim.Lars(ps, **common, foreach=False),
        "timm Lars foreach": lambda ps: timm.optim.Lars(ps, **common, foreach=True),
        "torch SGD foreach": lambda ps: torch.optim.SGD(ps, **common, foreach=True),
        **lightly_lars(common),
    }


def lightly_lars(common: dict) -> dict[str, Callable]:
    """lightly's LARS (``lightly.utils.lars``) when lightly is installed (``pip install
    .[bench]``); nothing otherwise."""
    try:
        from lightly.utils.lars import LARS as LightlyLARS
    except ImportError:
        return {}
    return {"lightly LARS": lambda ps: LightlyLARS(ps, **common)}


def time_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Milliseconds of one step, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def bench(model_name: str, device: torch.device, repeats: int, console: Console) -> None:
    """One table: every optimizer built first, then timed in turn, one step each per round,
    so that a noisy spell of the machine touches every row alike. Every row holds its own
    parameters, gradients and state at once: about 11 GB for ViT-B/16's rows."""
    built = {}
    for label, make in optimizers().items():
        opt = make(parameter_set(model_name, device))
        first_ms = time_step(opt, device)  # creates state; compiles the fused path
        # Dispatch modes cannot see inside a compiled graph: the fused row has no counts.
        counts = None if "fused" in label else count_ops(opt.step)
        built[label] = (opt, counts, first_ms)
    times: dict[str, list[float]] = {label: [] for label in built}
    for _ in range(repeats):
        for label, (opt, _, _) in built.items():
            times[label].append(time_step(opt, device))
    rows = [
        (label, counts, statistics.median(times[label]), first_ms)
        for label, (_, counts, first_ms) in built.items()
    ]
    sgd_ms = next(ms for label, _, ms, _ in rows if label == "torch SGD foreach")
    n_params = len(next(iter(built.values()))[0].param_groups[0]["params"])
    table = Table(title=f"{model_name} ({n_params} tensors) on {device.type}, {repeats} steps")
    for column in (
        "optimizer",
        "aten ops/step",
        "host syncs/step",
        "median ms/step",
        "x SGD foreach",
        "first step ms",
    ):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for label, counts, ms, first_ms in rows:
        table.add_row(
            label,
            str(counts.ops) if counts else "compiled",
            str(counts.syncs) if counts else "-",
            f"{ms:.2f}",
            f"{ms / sgd_ms:.2f}",
            f"{first_ms:.0f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-50 only, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row")
    args = parser.parse_args()
    console = Console(width=120)
    models = ["resnet50"] if args.quick else ["resnet50", "vit_b_16"]
    repeats = args.repeats or (5 if args.quick else 20)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    console.print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
        "ops and syncs are counted on one steady-state step; first step ms includes compilation"
    )
    for device in devices:
        for model_name in models:
            bench(model_name, device, repeats, console)


if __name__ == "__main__":
    main()
