import os
import random
import re
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_toolkit.checkpoint import (
    Checkpointer,
    CheckpointError,
    atomic_write,
    capture_rng_state,
    checkpoint_path,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    upgrade_checkpoint,
)

_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return "pwned"


class _Unsafe:
    def __reduce__(self):
        return (_side_effect, ())


def test_round_trip_creates_parent_dirs(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = {"step": 7, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "names": ["a", "b"]}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["names"] == ["a", "b"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"step": 2, "partial": torch.zeros(1000)}, f)  # bytes hit the temp file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's\n")
    return victim


def test_a_symlink_at_the_target_is_replaced_and_its_target_never_written(tmp_path):
    victim = _victim(tmp_path)
    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir()
    path.symlink_to(victim)
    atomic_write(path, lambda f: f.write(b"{}\n"))
    assert victim.read_text() == "someone else's\n"
    assert not path.is_symlink() and path.read_bytes() == b"{}\n"


def test_a_file_at_the_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    victim = _victim(tmp_path)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * 2 * n)  # a name known ahead
    planted = tmp_path / f".summary.json.{'0' * 16}.tmp"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "summary.json", lambda f: f.write(b"{}\n"))
    assert victim.read_text() == "someone else's\n" and planted.is_symlink()
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("hard_links", [True, False])
def test_checkpoint_links_replace_a_symlink_without_following_it(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them: last.pt and best.pt are copies

        def no_link(*args, **kwargs):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    victim = _victim(tmp_path)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("last.pt", "best.pt"):
        (directory / name).symlink_to(victim)
    saver = Checkpointer(tmp_path, {"n": Recorded([7])}, every_steps=1, steps_per_epoch=1)
    saver.save(1, best=True)
    assert victim.read_text() == "someone else's\n"
    for name in ("last.pt", "best.pt"):
        assert not (directory / name).is_symlink()
        assert torch.load(directory / name, weights_only=True) == {"n": 7}
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "step-00000001.pt"]


def test_save_replaces_existing_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Unsafe()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert (
        str(path) in message
        and "test_checkpoint._side_effect" in message
        and "weights_only" in message
    )
    assert "\n" not in message
    assert _EXECUTED == []


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"], ids=repr
)
def test_garbage_file_raises_checkpoint_error_naming_path(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_checkpoint_and_missing_file_and_non_dict(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(path, [1, 2])
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)
    assert issubclass(CheckpointError, ValueError)


def _draws() -> tuple:
    return (
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        random.random(),
        random.gauss(0.0, 1.0),
    )


def _only_safe_types(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_safe_types(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(_only_safe_types(v) for v in obj)
    return obj is None or isinstance(obj, torch.Tensor | int | float)


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    # Leave cached Gaussians pending in numpy and Python, the easily forgotten parts of the state.
    np.random.standard_normal()
    random.gauss(0.0, 1.0)
    state = capture_rng_state()
    assert _only_safe_types(state)
    expected = _draws()

    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": state})
    loaded = load_checkpoint(path)["rng"]
    _draws()  # advance every generator
    restore_rng_state(loaded)
    assert _draws() == expected
    restore_rng_state(loaded)
    assert _draws() == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_round_trip(tmp_path):
    torch.cuda.manual_seed_all(7)
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(5, device="cuda").tolist()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    loaded = load_checkpoint(tmp_path / "rng.pt", map_location="cuda")["rng"]
    torch.rand(5, device="cuda")
    restore_rng_state(loaded)
    assert torch.rand(5, device="cuda").tolist() == expected


def test_checkpoint_path_is_last_pt_under_checkpoints(tmp_path):
    assert checkpoint_path(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "last.pt"
    assert checkpoint_path("runs/x") == Path("runs/x/checkpoints/last.pt")


class Recorded:
    """A checkpoint component whose state is the next of ``values``; records what it loads."""

    def __init__(self, values=()) -> None:
        self.values = iter(values)
        self.loaded: list = []

    def state_dict(self):
        return next(self.values)

    def load_state_dict(self, state) -> None:
        if state == "refused":
            raise ValueError("size mismatch for weight\nsecond line")
        self.loaded.append(state)


def test_checkpointer_saves_every_n_steps_each_epoch_end_and_the_last_step(tmp_path):
    counter = Recorded(range(100))
    saver = Checkpointer(tmp_path, {"n": counter}, every_steps=4, steps_per_epoch=6)
    due = [step for step in range(1, 15) if saver.save(step, last_step=step == 14)]
    assert due == [4, 6, 8, 12, 14]  # multiples of 4, epoch ends 6 and 12, the last step
    assert torch.load(checkpoint_path(tmp_path), weights_only=True) == {"n": 4}
    assert not saver.should_save(5) and saver.should_save(5, last_step=True)
    gathered = Recorded([{}])
    quiet = Checkpointer(
        tmp_path / "other", {"c": gathered}, every_steps=1, steps_per_epoch=1, enabled=False
    )
    assert quiet.save(1) and not (tmp_path / "other").exists()  # due, but another rank writes
    with pytest.raises(StopIteration):
        gathered.state_dict()  # every rank took the state when the save was due


def test_restore_gives_every_component_its_own_state_in_order(tmp_path):
    order = []

    class Ordered(Recorded):
        def __init__(self, name: str, value: int) -> None:
            super().__init__([value])
            self.name = name

        def load_state_dict(self, state) -> None:
            order.append(self.name)
            super().load_state_dict(state)

    first, second = Ordered("first", 1), Ordered("second", 2)
    saver = Checkpointer(
        tmp_path, {"first": first, "second": second}, every_steps=1, steps_per_epoch=1
    )
    saver.save(1)
    restored = {name: Ordered(name, 0) for name in ("first", "second")}
    Checkpointer(tmp_path, restored, every_steps=1, steps_per_epoch=1).restore(
        checkpoint_path(tmp_path), {**load_checkpoint(checkpoint_path(tmp_path)), "trainer": {}}
    )
    assert order == ["first", "second"]
    assert restored["first"].loaded == [1] and restored["second"].loaded == [2]


def test_restore_names_the_file_and_the_component_it_cannot_load(tmp_path):
    path = tmp_path / "c.pt"
    checkpointer = Checkpointer(
        tmp_path, {"model": Recorded(), "loader": Recorded()}, every_steps=1, steps_per_epoch=1
    )
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {re.escape(str(path))} holds no loader state"
    ):
        checkpointer.restore(path, {"trainer": {}, "model": 1})
    with pytest.raises(CheckpointError) as info:
        checkpointer.restore(path, {"trainer": {}, "model": "refused", "loader": 2})
    assert str(info.value) == (
        f"checkpoint {path} does not match this config (model: size mismatch for weight)"
    )


def test_a_checkpoint_of_the_earlier_layout_is_converted():
    """The layout written before components saved themselves: the trainer's counters at the
    top, and a loader position without the batch size and world size it counts in."""
    old = {
        "model": {"w": torch.ones(1)},
        "optimizer": {},
        "scaler": {},
        "step": 6,
        "epoch": 1,
        "loader": {"epoch": 1, "position": 2, "generator": torch.zeros(3)},
        "ranks": [{}, {}],
        "best_knn": 0.5,
        "wandb_run_id": "abc",
        "config": {"data": {"batch_size": 32}},
    }
    new = upgrade_checkpoint(old, Path("old.pt"))
    assert new["trainer"] == {
        "step": 6,
        "best_knn": 0.5,
        "wandb_run_id": "abc",
        "config": old["config"],
    }
    assert new["loader"] == {**old["loader"], "batch_size": 32, "world_size": 2}
    assert "batch_size" not in old["loader"], "the loaded dict is not changed"
    assert upgrade_checkpoint(new, Path("new.pt")) is new
    with pytest.raises(CheckpointError, match=r"old\.pt holds no per-process state"):
        upgrade_checkpoint({"model": {}, "step": 1}, Path("old.pt"))
