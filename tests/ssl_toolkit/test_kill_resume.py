"""A run killed with SIGKILL mid-epoch and resumed with ``--resume auto`` ends bitwise equal
to one never stopped, in every tensor of its checkpoint (model, optimizer, data order and every
random generator), with exact gradient accumulation, in one process and under torchrun: a
multi-crop SwAV run whose queue (each process's own) is in use, a SimCLR run on tar shards read
by two workers per process, and a ViT with drop path (which draws from torch's global generator
in every forward) on shards and on an image folder. Two-view methods resume bitwise on 2
processes in ``test_multiprocess.py``.

SIGKILL gives the trainer no chance to save: the resume comes from the last checkpoint the
run wrote on its own (possibly while a write was cut short), which is what a lost machine or
the kernel's OOM killer leaves behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from scripts.make_shards import main as make_shards
from ssl_toolkit.checkpoint import load_checkpoint, step_checkpoints
from tests.data.test_folders import _class_folders
from tests.ssl_toolkit.test_multiprocess import _free_port

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300

SMALL = [
    "model.backbone=timm/test_resnet",
    "method.projector={hidden_dim: 32, out_dim: 16}",
    "data.name=synthetic",  # 256 images
    "data.num_workers=0",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.accumulate_grad_batches=2",
    "trainer.accumulation=exact",
    "trainer.checkpoint_every_steps=1",
    "eval.every_epochs=100",  # no kNN monitor mid-run; the probes at the end only
    "eval.baseline=false",
    "logging.wandb.mode=disabled",
]
# Multi-crop (2 x 32 + 4 x 16 px), the queue full after the first step and used from then on.
SWAV = [
    "--config",
    "swav_lars",
    "method.prototypes=16",
    "method.queue_length=64",
    "method.queue_start_epoch=0",
    "optim.freeze.steps=2",
]


def _command(world_size: int) -> list[str]:
    """``pretrain.py`` in one process, or under torchrun with ``world_size`` of them."""
    script = str(ROOT / "scripts" / "pretrain.py")
    if world_size == 1:
        return [sys.executable, script]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world_size)]
    return [sys.executable, *launcher, "--master-port", str(_free_port()), script]


def _start(
    run: Path, world_size: int, batch_size: int, recipe: list[str], *args: str
) -> subprocess.Popen:
    """A pretraining run into ``run`` in a session of its own, its output in files there (a
    full pipe would stall a run the test is polling), one thread per process (torchrun's
    default for its ranks)."""
    run.mkdir(parents=True, exist_ok=True)
    name = "resumed" if "--resume" in args else "first"
    with open(run / f"{name}.out", "w") as out, open(run / f"{name}.err", "w") as err:
        return subprocess.Popen(
            [
                *_command(world_size),
                *recipe,
                *SMALL,
                f"data.batch_size={batch_size}",
                f"trainer.output_dir={run}",
                *args,
            ],
            stdout=out,
            stderr=err,
            cwd=run,
            env=os.environ | {"OMP_NUM_THREADS": "1"},  # two runs alongside on 2 cores
            start_new_session=True,
        )


def _finish(process: subprocess.Popen, run: Path) -> str:
    """Wait for ``process`` to succeed; its stderr."""
    process.wait(timeout=TIMEOUT)
    name = "resumed" if "--resume" in process.args else "first"
    err = (run / f"{name}.err").read_text()
    assert process.returncode == 0, err[-3000:]
    return err


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from ``/proc`` (torchrun starts each rank in a session of
    its own, so killing the launcher's process group leaves the ranks running)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = [int(child) for child in children.read_text().split()]
        except OSError:  # the thread or process ended meanwhile
            continue
        for child in pids:
            found += [child, *_descendants(child)]
    return found


def _dead(pid: int) -> bool:
    """True when ``pid`` has exited (gone, or a zombie waiting for its new parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and everything it started (the launcher first, so that it cannot
    react to its ranks dying), and wait until all of them are dead."""
    pids = [process.pid, *_descendants(process.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_dead(pid) for pid in pids), f"still running after SIGKILL: {pids}"


def _last_step(run: Path) -> int:
    """The step of the checkpoint ``last.pt`` names (a link to a whole step file, replaced
    atomically), 0 before any. Not the newest step file: a run killed between writing it and
    linking ``last.pt`` to it resumes from ``last.pt``."""
    last = run / "checkpoints" / "last.pt"
    for path in step_checkpoints(run / "checkpoints"):
        with contextlib.suppress(OSError):  # a file removed or replaced meanwhile
            if os.path.samefile(path, last):
                return int(path.stem.removeprefix("step-"))
    return 0


def _kill_mid_epoch(process: subprocess.Popen, run: Path, steps_per_epoch: int) -> None:
    """SIGKILL the run once it has saved a step inside its second epoch, while it trains on."""
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        step = _last_step(run)
        if step > steps_per_epoch and step % steps_per_epoch:
            break
        time.sleep(0.01)
    assert process.poll() is None, (
        f"the run ended (or timed out) before a mid-epoch checkpoint of its second epoch; "
        f"last.pt at step {_last_step(run)}"
    )
    _kill_all(process)


def _tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint entry, by its dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        if isinstance(value, dict | list | tuple | torch.Tensor):
            found |= _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def _assert_bitwise_equal(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    a, b = _tensors(expected), _tensors(actual)
    assert a and a.keys() == b.keys(), f"{what}: no tensors, or other ones"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} of {len(a)} tensors differ: {different[:5]}"


def _kill_resume_is_bitwise(
    tmp_path: Path,
    *,
    world_size: int,
    batch_size: int,
    steps_per_epoch: int,
    recipe: list[str] = SWAV,
    overrides: tuple[str, ...] = (),
) -> None:
    """Run A straight through and run B killed mid-epoch then resumed; the same checkpoint,
    tensor for tensor, and the same backbone. ``overrides`` (the data, the backbone) apply
    to both."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = _start(straight, world_size, batch_size, recipe, *overrides)  # alongside B: 2 cores
    try:
        victim = _start(killed, world_size, batch_size, recipe, *overrides)
        try:
            _kill_mid_epoch(victim, killed, steps_per_epoch)
        finally:
            if victim.poll() is None:
                _kill_all(victim)
        resumed = _start(killed, world_size, batch_size, recipe, *overrides, "--resume", "auto")
        err = _finish(resumed, killed)
        _finish(first, straight)
    finally:
        if first.poll() is None:
            _kill_all(first)

    found = re.search(r"resumed from (\S+) at step (\d+)", err)
    assert found, err[-3000:]
    path, step = Path(found.group(1)), int(found.group(2))
    assert path.parent == killed / "checkpoints"
    assert step > steps_per_epoch and step % steps_per_epoch, f"resumed at step {step}"
    last = [load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, killed)]
    assert [state["trainer"]["step"] for state in last] == [2 * steps_per_epoch] * 2
    _assert_bitwise_equal(last[0], last[1], "last.pt")  # model, optimizer, loader, every RNG
    assert {"model", "optimizer", "loader", "ranks"} <= {
        key.split(".")[0] for key in _tensors(last[0])
    }
    assert [rank["rng"]["python"] for rank in last[0]["ranks"]] == [
        rank["rng"]["python"] for rank in last[1]["ranks"]
    ]
    if recipe is SWAV:
        queues = [state["method_ranks"] for state in last]
        assert len(queues[0]) == world_size
        assert all(rank["queued_rows"] > rank["queue"].shape[1] for rank in queues[0])
        _assert_bitwise_equal(queues[0], queues[1], "last.pt SwAV queues")
    backbones = [
        torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)
        for run in (straight, killed)
    ]
    _assert_bitwise_equal(backbones[0], backbones[1], "backbone.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_killed_multi_crop_swav_run_resumes_bitwise_with_its_queues(
    tmp_path: Path, world_size: int
) -> None:
    """SwAV's 6 crops of 2 sizes and its queue: 256 images in micro-batches of 32 (or 16 on
    each of 2 processes, under torchrun with gloo), 2 a step: 4 steps an epoch."""
    _kill_resume_is_bitwise(
        tmp_path,
        world_size=world_size,
        batch_size=32 // world_size,
        steps_per_epoch=4,
    )


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes of 50 small JPEGs: 160 training images (the fixed 80/20 split)."""
    root = tmp_path_factory.mktemp("folder")
    _class_folders(root, {name: 50 for name in "abcd"})
    return root


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory: pytest.TempPathFactory, digit_folder: Path) -> Path:
    """The same images as shards of 16: 160 training images in 10 whole shards."""
    root = tmp_path_factory.mktemp("shards") / "shards"
    assert make_shards([str(digit_folder), str(root), "--shard-size", "16"]) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_killed_sharded_run_resumes_bitwise(
    tmp_path: Path, world_size: int, digit_shards: Path
) -> None:
    """SimCLR on tar shards read by 2 workers per process: 160 images in 10 shards, micro-
    batches of 16 (or 8 on each of 2 processes, 5 shards each), 2 a step: 5 steps an epoch."""
    _kill_resume_is_bitwise(
        tmp_path,
        world_size=world_size,
        batch_size=16 // world_size,
        steps_per_epoch=5,
        recipe=["--config", "simclr_lars"],
        overrides=("data.name=shards", f"data.root={digit_shards}", "data.num_workers=2"),
    )


def test_the_test_vit_with_drop_path_draws_from_the_global_generator() -> None:
    """What the next test relies on: in training, timm's test ViT with drop path draws from
    torch's global generator in its forward (and without drop path it does not)."""
    from models.backbones import build_backbone

    images = torch.zeros(2, 3, 32, 32)
    for rate, draws in ((0.2, True), (0.0, False)):
        model = build_backbone("timm/test_vit", drop_path_rate=rate).train()
        before = torch.get_rng_state()
        model(images)
        assert torch.equal(torch.get_rng_state(), before) is not draws


@pytest.mark.slow
@pytest.mark.parametrize("data", ["shards", "imagefolder"])
def test_a_killed_vit_with_drop_path_resumes_bitwise_with_decoding_workers(
    tmp_path: Path, data: str, digit_folder: Path, digit_shards: Path
) -> None:
    """SimCLR with timm's test ViT and drop path 0.2 on 160 images, shards or a folder, read
    by 2 workers: micro-batches of 16, 2 a step, 5 steps an epoch. Its forward draws from the
    global generator, so one draw after the resume (the DataLoader's base seed, say) would
    make every later drop-path mask, and the weights, differ."""
    root = digit_shards if data == "shards" else digit_folder
    _kill_resume_is_bitwise(
        tmp_path,
        world_size=1,
        batch_size=16,
        steps_per_epoch=5,
        recipe=["--config", "simclr_lars"],
        overrides=(
            "model.backbone=timm/test_vit",
            "model.drop_path_rate=0.2",
            f"data.name={data}",
            f"data.root={root}",
            "data.num_workers=2",
        ),
    )
