"""Nothing a run trained is lost: the end of a run, one run per directory, checks before the
first step, and the run directory's files (modes, strict JSON, resume warnings)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ssl_toolkit.trainer as trainer_module
from ssl_toolkit.checkpoint import CheckpointError, atomic_write, load_checkpoint, load_latest
from ssl_toolkit.config import load_config
from ssl_toolkit.data import build_dataset
from ssl_toolkit.evaluation import Evaluator
from ssl_toolkit.metrics_file import MetricsFile
from ssl_toolkit.preemption import Preempted
from ssl_toolkit.run_lock import LOCK_FILE, RunDirectoryError, RunLock
from ssl_toolkit.skipped_images import SkippedImages
from ssl_toolkit.trainer import Trainer
from tests.data.test_folders import _jpeg
from tests.ssl_toolkit.test_cli import ROOT, TINY, run_cli
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config

SCRIPT = ROOT / "scripts" / "pretrain.py"


def _strict_json(path: Path) -> dict:
    """``path`` read by a strict JSON reader: NaN and Infinity are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which strict JSON readers reject")

    return json.loads(path.read_text(), parse_constant=refuse)


def _failing_probes(monkeypatch: pytest.MonkeyPatch, message: str) -> list[int]:
    """Make the end-of-run probes raise ``ValueError(message)``; returns the list of calls."""
    calls: list[int] = []

    def probes(self, encoder):
        calls.append(1)
        raise ValueError(message)

    monkeypatch.setattr(Evaluator, "probes", probes)
    return calls


# --- the end of a run saves first, then evaluates ------------------------------------------


def test_a_failing_final_probe_keeps_the_checkpoint_backbone_and_summary(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _failing_probes(monkeypatch, "class 3 has only 2 samples")
    code, _, err = run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    backbone = torch.load(run / "backbone.pt", weights_only=True)
    assert backbone and all(isinstance(v, torch.Tensor) for v in backbone.values())
    summary = _strict_json(run / "summary.json")
    assert summary["steps"] == 2
    assert summary["probes"] == {"error": "ValueError: class 3 has only 2 samples"}
    assert summary["knn_top1"] is None and summary["baseline"] is None
    assert "the end-of-run probes failed (ValueError: class 3 has only 2 samples)" in err
    assert "Traceback" not in err


def test_resume_auto_at_the_end_computes_only_what_is_missing(monkeypatch, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=3)
    run = Path(cfg.trainer.output_dir)
    with monkeypatch.context() as patch:
        _failing_probes(patch, "no memory left")
        first = Trainer(cfg, logger=RecordingLogger()).fit()
    assert first.probe_error == "ValueError: no memory left"
    backbone_inode = (run / "backbone.pt").stat().st_ino

    # The probes are missing: only they run (and the baseline); no step, no new backbone.
    resumed = Trainer(cfg, resume="auto", logger=RecordingLogger())
    result = resumed.fit()
    summary = _strict_json(run / "summary.json")
    assert result.steps == 3 and result.probes is not None and result.baseline is not None
    assert summary["probes"]["knn_top1"] == result.probes.knn_top1
    assert summary["final_loss"] == pytest.approx(first.final_loss)  # the first session's
    assert summary["seconds"] == pytest.approx(first.seconds)
    assert (run / "backbone.pt").stat().st_ino == backbone_inode

    # Nothing is missing: the probes are not run again, and the summary stays as it was.
    calls = _failing_probes(monkeypatch, "must not run")
    again = Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()
    assert calls == [] and again.probes == result.probes
    assert _strict_json(run / "summary.json") == summary


def test_a_resume_at_the_end_without_a_summary_writes_strict_json(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=2)
    first = Trainer(cfg, logger=RecordingLogger()).fit()
    summary_path = Path(cfg.trainer.output_dir) / "summary.json"
    summary_path.unlink()  # as a kill during its first write leaves it
    result = Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()
    # This session trained nothing: the figures are those the final checkpoint carries.
    figures = ("final_loss", "images_per_s", "seconds")
    assert [getattr(result, key) for key in figures] == [getattr(first, key) for key in figures]
    summary = _strict_json(summary_path)
    assert [summary[key] for key in figures] == [getattr(first, key) for key in figures]
    assert summary["steps"] == 2 and first.images_per_s > 0
    assert summary["probes"]["knn_top1"] == result.probes.knn_top1


def test_sigterm_during_the_last_checkpoint_write_stops_after_it(
    monkeypatch, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, max_steps=3)
    calls = _failing_probes(monkeypatch, "the probes must not start after SIGTERM")
    real_save = trainer_module.Checkpointer.save

    def save_then_signal(self, step, **kwargs):
        due = real_save(self, step, **kwargs)
        if step == 3:  # the signal lands while the final checkpoint is written
            os.kill(os.getpid(), signal.SIGTERM)
        return due

    monkeypatch.setattr(trainer_module.Checkpointer, "save", save_then_signal)
    trainer = Trainer(cfg, logger=RecordingLogger())
    with pytest.raises(Preempted) as info:
        trainer.fit()
    assert info.value.exit_code == 143 and info.value.step == 3
    run = Path(cfg.trainer.output_dir)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 3
    assert (run / "backbone.pt").is_file() and calls == []
    assert _strict_json(run / "summary.json")["probes"] is None  # left for --resume auto


# --- one run per directory ----------------------------------------------------------------


def _wait_until_locked(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once another process holds the lock at ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                fcntl.flock(f, fcntl.LOCK_UN)
        time.sleep(0.05)
    raise AssertionError(f"no process took {path} within {timeout} s")


def test_a_second_run_into_a_busy_directory_exits_2_and_the_first_finishes(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    args = [sys.executable, str(SCRIPT), "--config", "simclr_lars", *TINY]
    first = subprocess.Popen(
        [*args, "trainer.max_steps=10", f"trainer.output_dir={run}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_locked(run / LOCK_FILE, first)
        first.send_signal(signal.SIGSTOP)  # it holds the directory while the second starts
        try:
            second = subprocess.run(
                [*args, "trainer.max_steps=5", f"trainer.output_dir={run}"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: trainer.output_dir: {run} is in use by another run (pid {first.pid}); "
            "wait for it to end or choose another output_dir"
        ]
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 10
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))[-1] == (
        "step-00000010.pt"
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    assert "max_steps: 10" in (run / "config.yaml").read_text()


def test_a_lock_left_by_a_killed_run_blocks_no_one(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from ssl_toolkit.run_lock import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}); lock.acquire(); "
            "print('locked', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"in use by another run \(pid {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)  # stale file stays
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(
    capsys, tmp_path: Path
) -> None:
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("not the run's\n")
    (run / LOCK_FILE).symlink_to(victim)
    code, _, err = run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: trainer.output_dir: {run / LOCK_FILE} is a symbolic link, not the run's lock "
        "file; remove it"
    ]
    assert victim.read_text() == "not the run's\n" and not (run / "checkpoints").exists()


class _Killed(BaseException):
    """What a kill is to a write: nothing after it runs."""


def _leftover(path: Path) -> Path:
    """The temporary file that a write of ``path`` killed before its rename leaves behind,
    under the name :func:`atomic_write` gives it."""
    seen: list[Path] = []

    def write(file) -> None:
        file.write(b"partial")
        seen.extend(p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))
        raise _Killed

    with pytest.raises(_Killed):
        atomic_write(path, write)
    (leftover,) = seen
    leftover.write_bytes(b"partial")  # atomic_write cleans up after an exception; a kill does not
    return leftover


def test_taking_the_lock_removes_what_killed_writes_left_and_nothing_else(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    ours = [
        _leftover(run / "summary.json"),
        _leftover(run / "backbone.pt"),
        _leftover(run / "checkpoints" / "step-00000003.pt"),
    ]
    victim = tmp_path / "victim.tmp"
    victim.write_text("someone's\n")
    theirs = [
        run / "notes.tmp",
        run / "foo.pt.tmp",
        run / ".foo.pt.tmp",
        run / "checkpoints" / ".step-00000003.pt.tmp",
        run / f"x{ours[0].name}",
        run / "wandb" / ours[0].name,  # not a folder the run writes itself
    ]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("someone's\n")
    link = run / ours[1].name.replace("backbone", "notes")
    link.symlink_to(victim)  # named as ours, but the run never makes links
    with RunLock(run):
        assert not any(path.exists() for path in ours)
    assert all(path.read_text() == "someone's\n" for path in [*theirs, victim])
    assert link.is_symlink()


def test_without_a_lock_no_temporary_file_is_removed(monkeypatch, tmp_path: Path) -> None:
    import errno

    import ssl_toolkit.run_lock as run_lock

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    leftover = _leftover(tmp_path / "summary.json")
    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with pytest.warns(RuntimeWarning, match="cannot be locked"), RunLock(tmp_path) as lock:
        assert not lock.held
    assert leftover.read_bytes() == b"partial"  # another run may be writing it


def test_a_trainer_holds_the_lock_until_fit_returns(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=1)
    trainer = Trainer(cfg, logger=RecordingLogger())
    with pytest.raises(RunDirectoryError, match="in use by another run"):
        Trainer(cfg, logger=RecordingLogger())
    trainer.fit()
    assert not trainer.run_lock.held
    Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()


def test_a_fresh_run_over_an_earlier_runs_checkpoints_says_so(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=3)
    Trainer(cfg, logger=RecordingLogger()).fit()
    with pytest.warns(RuntimeWarning, match=r"holds checkpoints of an earlier run \(up to "):
        Trainer(cfg, logger=RecordingLogger()).fit()


# --- usage errors found before the first step ---------------------------------------------


def _unwritable(tmp_path: Path) -> tuple[Path, str]:
    """A folder this process cannot create, and the system's reason: under a read-only
    folder, or in ``/sys`` for root (whom permission bits do not stop)."""
    if os.geteuid() == 0:
        target = Path("/sys/ssl-toolkit-test-run")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
        target = parent / "run"
    with pytest.raises(OSError) as refused:  # the premise of the test
        target.mkdir()
    return target, refused.value.strerror


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.batch_size=300",
            "data.batch_size: 300 is larger than the training set (256 images); the largest "
            "value allowed is 256",
        ),
        (
            "trainer.accumulate_grad_batches=9",
            "trainer.accumulate_grad_batches: 9 is more than the 8 batches of an epoch "
            "(data.batch_size=32); the largest value allowed is 8",
        ),
        (
            "model.backbone=timm/vit_tiny_patch16_224",
            "model.backbone: timm/vit_tiny_patch16_224 cannot take data.image_size=32 images "
            "(Input height (32) doesn't match model (224).)",
        ),
    ],
)
def test_what_cannot_train_is_exit_2_before_the_first_step(
    capsys, tmp_path: Path, override: str, message: str
) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "--config", "simclr_lars", *TINY, override, f"trainer.output_dir={run}"
    )
    assert code == 2
    assert err.strip().splitlines() == [f"error: {message}"]
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "unwritable"])
def test_an_output_dir_that_cannot_be_a_folder_is_exit_2(capsys, tmp_path: Path, case) -> None:
    (tmp_path / "file").write_text("not a folder")
    if case == "unwritable":
        run, strerror = _unwritable(tmp_path)
        reason = f"cannot be created ({strerror})"
    else:
        run, reason = {
            "a file": (tmp_path / "file", "is a file, not a folder"),
            "under a file": (
                tmp_path / "file" / "run",
                "cannot be created: a part of its path is a file",
            ),
        }[case]
    code, _, err = run_cli(capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={run}")
    assert code == 2
    assert err.strip().splitlines() == [f"error: trainer.output_dir: {run} {reason}"]


def test_the_dry_forward_changes_nothing_the_run_computes(tmp_path: Path) -> None:
    """Checking the model's shapes first must not move batch-norm statistics or any random
    stream: the first step is the same as without it."""
    cfg = tiny_config(tmp_path, max_steps=1)
    checked = Trainer(cfg, logger=RecordingLogger())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "dry_forward", lambda *args, **kwargs: None)
        unchecked = Trainer(tiny_config(tmp_path / "b", max_steps=1), logger=RecordingLogger())
    for trainer in (checked, unchecked):
        trainer.fit()
    a, b = checked.method.state_dict(), unchecked.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- checkpoints and run files ------------------------------------------------------------


class _Unsafe:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_an_unsafe_legacy_pickle_is_reported_as_refused_not_corrupt(capsys, tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"payload": _Unsafe()}, evil, _use_new_zipfile_serialization=False)
    code, _, err = run_cli(
        capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={tmp_path / 'run'}",
        "--resume", str(evil),
    )  # fmt: skip
    assert code == 2
    assert f"checkpoint {evil} cannot be loaded: it is refused as unsafe: it references " in err
    assert "corrupt" not in err and "unsafe\n" not in capsys.readouterr().out


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        cfg = tiny_config(tmp_path, max_steps=2)
        Trainer(cfg, logger=RecordingLogger()).fit()
    finally:
        os.umask(previous)
    run = Path(cfg.trainer.output_dir)
    files = ["config.yaml", "summary.json", "backbone.pt", "checkpoints/step-00000002.pt"]
    files += ["checkpoints/last.pt", LOCK_FILE]
    assert {name: oct((run / name).stat().st_mode & 0o777) for name in files} == {
        name: "0o644" for name in files
    }


def _plant_links(run: Path, names: list[str], victims: Path) -> dict[str, str]:
    """A symbolic link at each of ``names`` in ``run`` to a file of its own in ``victims``;
    what each of those files holds."""
    held = {}
    for name in names:
        victim = victims / name.replace("/", "_")
        victim.parent.mkdir(parents=True, exist_ok=True)
        held[name] = f"{name}: someone else's file\n"
        victim.write_text(held[name])
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    return held


def _victims(victims: Path, names: dict[str, str]) -> dict[str, str]:
    return {name: (victims / name.replace("/", "_")).read_text() for name in names}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # an earlier run's files, damaged rows
def test_no_run_file_is_written_through_a_symlink(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=2)
    run, victims = Path(cfg.trainer.output_dir), tmp_path / "victims"
    files = ["config.yaml", "summary.json", "backbone.pt", "report.html", "metrics.jsonl"]
    files += ["trust_ratio_heatmap.png"]
    checkpoints = ["checkpoints/step-00000002.pt", "checkpoints/last.pt", "checkpoints/best.pt"]
    held = _plant_links(run, files + checkpoints, victims)
    Trainer(cfg, logger=RecordingLogger()).fit()
    assert _victims(victims, held) == held
    assert not [name for name in held if (run / name).is_symlink()]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["trainer"]["step"] == 2

    # A resume at the end writes each of them again (the trust ratios are in the earlier
    # rows, which the planted metrics.jsonl lacks: the report comes without a heatmap).
    held = _plant_links(run, files[:-1], victims)
    Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()
    assert _victims(victims, held) == held
    assert not [name for name in held if (run / name).is_symlink()]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_the_skipped_images_list_is_not_appended_through_a_symlink(tmp_path: Path) -> None:
    held = _plant_links(tmp_path, ["skipped_images.txt"], tmp_path / "victims")
    skipped = SkippedImages(tmp_path, resumed=True)
    assert skipped.add(["a.jpg"]) == 1
    assert _victims(tmp_path / "victims", held) == held
    assert (tmp_path / "skipped_images.txt").read_text() == "a.jpg\n"


def test_metrics_rows_are_not_appended_through_a_symlink(monkeypatch, tmp_path: Path) -> None:
    import ssl_toolkit.metrics_file as metrics_file

    # The link appears between the file's rewrite and its opening for rows.
    monkeypatch.setattr(metrics_file, "atomic_write", lambda path, write: None)
    held = _plant_links(tmp_path, ["metrics.jsonl"], tmp_path / "victims")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        logger = MetricsFile(tmp_path, resumed_at=0)
    logger.log({"train/loss": 1.0}, step=1)
    logger.finish()
    assert _victims(tmp_path / "victims", held) == held


def test_a_resume_under_another_config_warns_naming_the_keys(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=2)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=1)
    data = cfg.to_dict()
    data["data"]["batch_size"] = 16
    data["optim"]["lr"] = 0.5
    changed = type(cfg).from_dict(data)
    with pytest.warns(RuntimeWarning) as records:
        Trainer(changed, resume="auto", logger=RecordingLogger())
    message = " ".join(str(r.message) for r in records)
    assert "written under another config" in message
    assert "data.batch_size: 32 -> 16" in message and "optim.lr: 1.0 -> 0.5" in message


def test_a_dangling_last_checkpoint_link_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"step": 4}, directory / "step-00000004.pt")
    (directory / "last.pt").symlink_to(directory / "step-00000005.pt")  # deleted by hand
    with pytest.warns(RuntimeWarning, match=r"last\.pt is a dangling link \(to .*step-00000005"):
        path, state = load_latest(tmp_path)
    assert path.name == "step-00000004.pt" and state["step"] == 4
    (directory / "step-00000004.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no loadable checkpoint .*dangling link"):
        load_latest(tmp_path)


# --- image folders: bad images and classes, seen from a run -------------------------------


def _split_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 12):
    """``root/train/<class>/`` with ``per_class`` small JPEGs each and ``root/val/<class>/``
    with a quarter as many."""
    for split, count in (("train", per_class), ("val", per_class // 4)):
        for c, name in enumerate(classes):
            for i in range(count):
                _jpeg(root / split / name / f"{i:02d}.jpg", 20 + i % 3, 24, seed=100 * c + i)
    return root


def _folder_args(root: Path, run: Path) -> list[str]:
    return [
        "--config",
        "simclr_lars",
        "model.backbone=timm/test_resnet",
        "method.projector={hidden_dim: 32, out_dim: 16}",
        "data.name=imagefolder",
        f"data.root={root}",
        "data.batch_size=8",
        "data.image_size=16",
        "data.num_workers=0",
        "logging.wandb.mode=disabled",
        "trainer.device=cpu",
        "eval.knn_k=3",
        "eval.labels_per_class=2",
        f"trainer.output_dir={run}",
    ]


def test_a_corrupt_validation_image_fails_the_final_probe_not_the_run(
    capsys, tmp_path: Path
) -> None:
    root = _split_folder(tmp_path / "images")
    bad = root / "val" / "dog" / "01.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_folder_args(root, run), "trainer.max_steps=2")
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert (run / "backbone.pt").is_file()
    error = _strict_json(run / "summary.json")["probes"]["error"]
    assert error.startswith(f"BadImageError: cannot decode the image {bad}: ")


def test_a_corrupt_validation_image_at_a_kNN_check_saves_the_step_first(
    capsys, tmp_path: Path
) -> None:
    root = _split_folder(tmp_path / "images")
    bad = root / "val" / "cat" / "00.jpg"
    bad.write_bytes(b"")
    run = tmp_path / "run"
    # 24 images in batches of 8: 3 steps an epoch, the kNN monitor after step 3 of 6.
    code, _, err = run_cli(
        capsys, *_folder_args(root, run), "trainer.epochs=2", "eval.every_epochs=1"
    )
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: cannot decode the image {bad}: ")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 3


def test_skip_bad_trains_on_lists_the_bad_images_and_logs_their_count(tmp_path: Path) -> None:
    root = _split_folder(tmp_path / "images")
    bad = [root / "train" / "cat" / "03.jpg", root / "train" / "dog" / "07.jpg"]
    for path in bad:
        path.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    overrides = [*_folder_args(root, run)[2:], "data.skip_bad=true", "trainer.max_steps=6"]
    cfg = load_config("simclr_lars", overrides)
    logger = RecordingLogger()
    Trainer(cfg, logger=logger).fit()  # two epochs: every image is met, the bad ones twice
    listed = (run / "skipped_images.txt").read_text().splitlines()
    assert sorted(listed) == sorted(str(p) for p in bad)
    counts = [m["data/skipped"] for _, m in logger.rows if "data/skipped" in m]
    assert counts and counts[-1] == 2 and counts == sorted(counts)


def test_labels_per_class_beyond_the_smallest_class_is_exit_2_before_training(
    capsys, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "--config", "simclr_lars", *TINY, "eval.labels_per_class=1000",
        f"trainer.output_dir={run}",
    )  # fmt: skip
    counts = build_dataset("synthetic").targets.bincount()  # the bank: the training split
    smallest = int(counts.argmin())
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: eval.labels_per_class: 1000 is more than class '{smallest}' of the evaluation "
        f"bank has ({counts[smallest]} images); the largest value allowed is {counts[smallest]}"
    ]
    assert not (run / "checkpoints").exists()


def test_one_class_trains_and_says_the_probes_are_skipped(capsys, tmp_path: Path) -> None:
    root = _split_folder(tmp_path / "images", classes=("cat",), per_class=24)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_folder_args(root, run), "trainer.max_steps=2")
    assert code == 0, err
    assert (
        f"kNN monitor and probes skipped: data.root='{root}' has one class (cat): the kNN "
        "monitor and the probes need at least two classes"
    ) in err
    summary = _strict_json(run / "summary.json")
    assert summary["steps"] == 2 and summary["probes"] is None and summary["knn_top1"] is None


# --- what an earlier run or session left behind -------------------------------------------


def test_a_fresh_run_removes_the_earlier_runs_backbone_and_summary(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=2)
    Trainer(cfg, logger=RecordingLogger()).fit()
    run = Path(cfg.trainer.output_dir)
    assert (run / "backbone.pt").is_file() and (run / "summary.json").is_file()
    with pytest.warns(RuntimeWarning, match="replaces them"):
        fresh = Trainer(cfg, logger=RecordingLogger())
    # Stopped before its end, it must not leave the earlier run's files to pass for its own.
    assert not (run / "backbone.pt").exists() and not (run / "summary.json").exists()
    fresh.run_lock.release()


def test_a_summary_of_another_step_is_not_taken_for_the_end_of_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, max_steps=3)
    done = Trainer(cfg, logger=RecordingLogger()).fit()
    path = Path(cfg.trainer.output_dir) / "summary.json"
    fake = {"knn_top1": 0.5, "linear_top1": 0.5, "linear_top1_few_labels": 0.5}
    path.write_text(
        json.dumps({"steps": 2, "final_loss": 9.0, "probes": {**fake, "labels_per_class": 10}})
    )
    result = Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()
    summary = _strict_json(path)
    assert summary["final_loss"] == done.final_loss  # 9.0 was another step's
    assert result.probes == done.probes and summary["probes"]["knn_top1"] == done.knn_top1


def test_the_best_checkpoint_links_to_last_when_the_step_file_is_gone(
    monkeypatch, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, max_steps=3, keep_checkpoints=1)
    with monkeypatch.context() as patch:
        _failing_probes(patch, "later")
        Trainer(cfg, logger=RecordingLogger()).fit()
    directory = Path(cfg.trainer.output_dir) / "checkpoints"
    (directory / "step-00000003.pt").unlink()  # last.pt, its hard link, stays
    (directory / "best.pt").unlink(missing_ok=True)
    result = Trainer(cfg, resume="auto", logger=RecordingLogger()).fit()
    assert result.probes is not None
    assert os.path.samefile(directory / "best.pt", directory / "last.pt")


def test_a_file_system_without_flock_warns_and_trains(monkeypatch, tmp_path: Path) -> None:
    import errno

    import ssl_toolkit.run_lock as run_lock

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    cfg = tiny_config(tmp_path, max_steps=1)
    with pytest.warns(RuntimeWarning, match=r"cannot be locked \(No locks available\)"):
        trainer = Trainer(cfg, logger=RecordingLogger())
    assert trainer.fit().steps == 1


def test_a_model_with_nothing_to_train_is_exit_2_before_it_is_wrapped(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    from ssl_toolkit.methods.simclr import SimCLR

    wrapped = []
    monkeypatch.setattr(SimCLR, "trainable_module", lambda self: self.requires_grad_(False))
    monkeypatch.setattr(trainer_module, "parallelize", lambda *a: wrapped.append(a))
    code, _, err = run_cli(
        capsys, "--config", "simclr_lars", *TINY, f"trainer.output_dir={tmp_path / 'run'}"
    )
    assert code == 2 and wrapped == []  # DDP would have failed on it with a traceback
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: optim: the model has no trainable parameters (all ")
    )
