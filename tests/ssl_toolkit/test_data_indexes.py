"""A run keeps its data indexes where ``data.index_dir`` says (else the per-user cache), and a
run directory inside the data folder is warned of and never trained on."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data.listing import INDEX_SUFFIX
from ssl_toolkit.evaluation import eval_datasets
from ssl_toolkit.trainer import Trainer
from tests.data.test_folders import _class_folders, unlabelled_folder
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config


def _folder_run(tmp_path: Path, root: Path, output_dir: Path, **data) -> ExperimentConfig:
    cfg = tiny_config(tmp_path, max_steps=1).to_dict()
    cfg["data"] = {"name": "imagefolder", "root": str(root), "batch_size": 4, "image_size": 16}
    cfg["data"] |= {"num_workers": 0, **data}
    cfg["trainer"]["output_dir"] = str(output_dir)
    return ExperimentConfig.from_dict(cfg)


def test_data_index_dir_is_where_the_evaluation_splits_keep_their_indexes(
    tmp_path: Path, _own_index_cache: Path
) -> None:
    _class_folders(tmp_path / "data", {"cat": 3, "dog": 3})
    chosen = tmp_path / "indexes"
    cfg = _folder_run(tmp_path, tmp_path / "data", tmp_path / "run", index_dir=str(chosen))
    bank, test = eval_datasets(cfg)
    assert len(bank) + len(test) == 6
    assert len(list(chosen.glob(f"listing-*{INDEX_SUFFIX}"))) == 1
    assert sorted(os.listdir(tmp_path)) == ["data", "indexes"]  # nothing beside the data
    cfg = _folder_run(tmp_path, tmp_path / "data", tmp_path / "run")
    eval_datasets(cfg)
    assert len(list(_own_index_cache.glob(f"listing-*{INDEX_SUFFIX}"))) == 1


def test_a_run_inside_the_data_folder_is_warned_of_and_not_trained_on(tmp_path: Path) -> None:
    root = unlabelled_folder(tmp_path / "images", count=8)
    earlier = root / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / ".run.lock").write_text("1\n")
    (earlier / "report.png").write_bytes((root / "img000.jpg").read_bytes())
    cfg = _folder_run(tmp_path, root, root / "runs" / "now")
    with pytest.warns(RuntimeWarning, match=r"trainer\.output_dir=.* is inside data\.root="):
        trainer = Trainer(cfg, logger=RecordingLogger())
    try:
        assert len(trainer.train_set) == 8 and not trainer.train_set.files.labelled
    finally:
        trainer.run_lock.release()
    outside = _folder_run(tmp_path, root, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(outside, logger=RecordingLogger()).run_lock.release()
    assert not [w for w in caught if "is inside data.root" in str(w.message)]
