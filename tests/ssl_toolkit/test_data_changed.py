"""A resume never continues silently on other data: images added to a folder or a shard added
to a set since the checkpoint are one error (exit 2) naming what changed, unless
``data.allow_changed`` says to go on; checkpoints of an earlier version resume unchecked,
with a note."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from scripts.make_shards import main as make_shards
from ssl_toolkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssl_toolkit.cli import main as pretrain
from ssl_toolkit.config import load_config
from ssl_toolkit.trainer import Trainer
from tests.data.test_folders import _class_folders, unlabelled_folder
from tests.ssl_toolkit.test_trainer import RecordingLogger

SMALL = [
    "model.backbone=timm/test_resnet",
    "method.projector={hidden_dim: 32, out_dim: 16}",
    "data.batch_size=8",
    "data.image_size=16",
    "data.num_workers=0",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.checkpoint_every_steps=1",
    "eval.every_epochs=100",
    "eval.baseline=false",
    "logging.wandb.mode=disabled",
]


def _overrides(run: Path, data: str, root: Path, *more: str) -> list[str]:
    return [*SMALL, f"data.name={data}", f"data.root={root}", f"trainer.output_dir={run}", *more]


def _trainer(run: Path, data: str, root: Path, *more: str, **kwargs: object) -> Trainer:
    cfg = load_config("simclr_lars", _overrides(run, data, root, *more))
    return Trainer(cfg, logger=RecordingLogger(), **kwargs)


def test_images_added_to_a_folder_stop_the_resume_naming_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """24 images, 3 steps an epoch; 8 more after step 1: the CLI exits 2 with one line."""
    folder = unlabelled_folder(tmp_path / "images", count=24)
    run = tmp_path / "run"
    _trainer(run, "imagefolder", folder).fit(stop_at_step=1)
    unlabelled_folder(tmp_path / "more", count=32)
    for image in sorted((tmp_path / "more").iterdir())[24:]:
        shutil.copy(image, folder / f"new-{image.name}")
    capsys.readouterr()

    code = pretrain(
        ["--config", "simclr_lars", *_overrides(run, "imagefolder", folder), "--resume", "auto"]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: data changed since the checkpoint")
    assert "24 -> 32 images" in errors[0] and "data.allow_changed=true" in errors[0]


def test_with_allow_changed_the_resume_warns_and_continues_on_the_new_data(
    tmp_path: Path,
) -> None:
    """Killed at step 4 (epoch 1, batch 1 of 3), resumed on 32 images (4 steps an epoch): one
    warning, the step becomes batch 1 of epoch 1 in the new epoch length (5 of 8), and its
    checkpoints record the new data, so that a later resume on it is no change."""
    folder = unlabelled_folder(tmp_path / "images", count=24)
    run = tmp_path / "run"
    _trainer(run, "imagefolder", folder).fit(stop_at_step=4)
    for i in range(8):
        shutil.copy(folder / f"img{i:03d}.jpg", folder / f"copy{i}.jpg")
    with pytest.raises(CheckpointError, match=r"24 -> 32 images \(data.root="):
        _trainer(run, "imagefolder", folder, resume="auto")

    with pytest.warns(RuntimeWarning, match="data changed since the checkpoint") as caught:
        resumed = _trainer(run, "imagefolder", folder, "data.allow_changed=true", resume="auto")
    assert len([w for w in caught if "data changed" in str(w.message)]) == 1
    assert "the interrupted epoch continues from the same point" in str(caught[0].message)
    assert not [w for w in caught if "another config" in str(w.message)]  # a resume switch
    assert (resumed.steps_per_epoch, resumed.total_steps, resumed.step) == (4, 8, 5)
    assert (resumed.loader.epoch, resumed.loader.position) == (1, 1)
    resumed.fit(stop_at_step=6)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["data"]["count"] == 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _trainer(run, "imagefolder", folder, resume="auto")  # the new data: the record
    assert not [w for w in caught if "another config" in str(w.message)]
    assert again.step == 6


def test_a_shard_added_to_the_set_stops_the_resume(tmp_path: Path) -> None:
    """10 training shards of 16 (160 images); a copy of one under another name makes 11."""
    _class_folders(tmp_path / "folder", {name: 50 for name in "abcd"})
    shards = tmp_path / "shards"
    assert make_shards([str(tmp_path / "folder"), str(shards), "--shard-size", "16"]) == 0
    run = tmp_path / "run"
    _trainer(run, "shards", shards).fit(stop_at_step=1)
    shutil.copy(shards / "train" / "train-000000.tar", shards / "train" / "extra-000000.tar")
    with pytest.raises(CheckpointError, match="10 -> 11 shards, 160 -> 176 images"):
        _trainer(run, "shards", shards, resume="auto")


def test_a_checkpoint_without_a_data_record_resumes_with_a_note(tmp_path: Path) -> None:
    """An earlier version's checkpoint (no ``trainer.data``) resumes as before."""
    folder = unlabelled_folder(tmp_path / "images", count=24)
    run = tmp_path / "run"
    _trainer(run, "imagefolder", folder).fit(stop_at_step=1)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["trainer"]["data"]
    save_checkpoint(last, state)
    console = Console(record=True, width=200)
    resumed = _trainer(run, "imagefolder", folder, resume="auto", console=console)
    assert resumed.step == 1
    assert "records nothing of the data it was trained on" in console.export_text()
