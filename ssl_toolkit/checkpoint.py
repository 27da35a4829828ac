"""Crash-safe checkpoint files and the random-generator state that makes a resume reproducible.

Checkpoints are written to a temporary file in the target directory and renamed over the old
one, so a crash mid-write never leaves a truncated ``last.pt``; a kill leaves the temporary
file, which :func:`remove_partial_writes` recognises by its name. No write follows a symbolic
link: the temporary file is created new, and the rename replaces a link at the target rather
than writing through it. They are read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects; everything saved must
therefore be tensors, numbers, strings, ``None`` and containers of those. The RNG helpers follow
that rule.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO

import numpy as np
import torch

from optim.errors import one_line

__all__ = [
    "LAST_CHECKPOINT",
    "CheckpointError",
    "Checkpointer",
    "Stateful",
    "atomic_write",
    "atomic_write_first",
    "capture_rng_state",
    "checkpoint_path",
    "load_checkpoint",
    "load_latest",
    "mismatch",
    "open_append",
    "remove_partial_writes",
    "restore_rng_state",
    "save_checkpoint",
    "step_checkpoints",
    "upgrade_checkpoint",
]


LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
"""Where a run directory keeps its latest checkpoint (``--resume auto`` looks there)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or holds objects unsafe to load."""


class Stateful(Protocol):
    """A component that saves and restores itself (torchtitan's ``Stateful``): what it
    returns from ``state_dict`` it takes back in ``load_state_dict``."""

    def state_dict(self) -> Any:
        """The component's state: tensors, numbers, strings, ``None`` and containers of them."""

    def load_state_dict(self, state: Any) -> None:
        """Restore a state returned by :meth:`state_dict`."""


def checkpoint_path(run_dir: str | Path) -> Path:
    """The latest checkpoint of the run in ``run_dir``: ``<run_dir>/checkpoints/last.pt``."""
    return Path(run_dir) / LAST_CHECKPOINT


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on POSIX file systems; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# torch's wordings: "Unsupported global: GLOBAL x.y" and "unsupported GLOBAL x.y whose ...".
_UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)


def _describe(exc: Exception) -> str:
    """One line saying why ``torch.load`` failed (its own messages span several paragraphs)."""
    text = " ".join(str(exc).split())
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return (
            f"it is refused as unsafe: it references {unsafe.group(1)}, which weights_only "
            "loading does not allow (only tensors and plain containers load)"
        )
    first_sentence = text.split(". ")[0] if text else "unexpected end of file"
    return f"it is corrupt or truncated ({type(exc).__name__}: {first_sentence})"


_PARTIAL_WRITE = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
"""The name of a temporary file of :func:`atomic_write`: ``.<name>.<16 hex digits>.tmp``."""


def _temporary(path: Path) -> Path:
    """A new temporary name beside ``path``, of the :data:`_PARTIAL_WRITE` shape."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through ``write(file)``, atomically, creating parent directories.

    The data goes to a new temporary file in the same directory (``O_CREAT | O_EXCL |
    O_NOFOLLOW``: nothing already at its name is opened, a link least of all; the mode is
    open()'s, 0666 less the umask), is flushed and fsynced, then ``os.replace`` swaps it in,
    replacing whatever is at ``path`` (a symbolic link too, never its target). On any failure
    the temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def open_append(path: Path) -> TextIO:
    """``path`` opened to append text, created if missing (0666 less the umask), never through
    a symbolic link: a link at ``path`` raises ``OSError`` (ELOOP)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o666), "a")


def remove_partial_writes(directory: Path) -> None:
    """Remove the temporary files that writes killed before their rename left in
    ``directory``: regular files named exactly as :func:`atomic_write` names them, nothing
    else (a user's ``notes.tmp`` stays, and so does a link). Only the holder of the run
    directory's lock may call it: another run's write in flight has such a file too."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if _PARTIAL_WRITE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def atomic_write_first(paths: Sequence[Path], data: bytes) -> Path | None:
    """Write ``data`` atomically at the first of ``paths`` that can be written (an index goes
    to the next place where one cannot be written); where, or ``None``."""
    for path in paths:
        with contextlib.suppress(OSError):
            atomic_write(path, lambda file: file.write(data))
            return Path(path)
    return None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path`` with ``torch.save`` (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file if it does not exist, cannot be read as a
    torch checkpoint (truncated, corrupt, not a checkpoint), contains objects that
    ``weights_only`` loading refuses, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_describe(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot this process's global random generators in a ``weights_only``-loadable form.

    Returned keys:

    - ``"torch"``: CPU generator state, a uint8 tensor (``torch.get_rng_state()``).
    - ``"cuda"``: list of uint8 tensors, one per visible CUDA device, or ``None`` without CUDA.
    - ``"numpy"``: numpy's legacy global MT19937 generator as ``{"keys": int64 tensor (624,),
      "pos": int, "has_gauss": int, "cached_gaussian": float}``.
    - ``"python"``: ``random.getstate()``, a tuple ``(version, tuple of 625 ints, gauss_next)``.

    Only the calling process's generators are captured; in a multi-process run each rank has
    its own.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state` (also after save/load).

    CUDA states are restored for the devices present in both the snapshot and this machine.
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device=index)
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


_REFUSED = (KeyError, IndexError, AttributeError, RuntimeError, ValueError, TypeError)
"""What a component raises on a state it cannot take (a checkpoint of another config)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return one_line(text.splitlines()[0] if text else repr(err))


def mismatch(path: Path, reason: str) -> CheckpointError:
    """The error of a checkpoint that does not fit this run: one line naming the file."""
    return CheckpointError(f"checkpoint {path} does not match this config ({reason})")


def upgrade_checkpoint(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint of the earlier layout in the current one (a copy; others unchanged).

    The earlier layout kept the trainer's counters at the top level (``step``, ``best_knn``,
    ``wandb_run_id``, ``config``) and the loader's position without the batch size and world
    size it counts in; those come from the saved config and the per-process states.
    """
    if "trainer" in state:
        return state
    if "ranks" not in state or "step" not in state:
        raise CheckpointError(
            f"checkpoint {path} holds no per-process state (an older format); start a new run"
        )
    upgraded = dict(state)
    upgraded["trainer"] = {
        "step": state["step"],
        "best_knn": state.get("best_knn", float("-inf")),
        "wandb_run_id": state.get("wandb_run_id"),
        "config": state.get("config"),
    }
    batch_size = ((state.get("config") or {}).get("data") or {}).get("batch_size")
    if isinstance(state.get("loader"), dict) and batch_size is not None:
        upgraded["loader"] = {
            "batch_size": batch_size,
            "world_size": len(state["ranks"]),
            **state["loader"],
        }
    return upgraded


def _link(source: Path, target: Path) -> None:
    """Make ``target`` name the same file as ``source``, atomically: a hard link under a
    temporary name (:func:`atomic_write`'s kind), renamed into place, which replaces a
    symbolic link at ``target`` rather than following it; a copy where the file system has no
    hard links."""
    tmp = _temporary(target)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as original:
            atomic_write(target, lambda copy: shutil.copyfileobj(original, copy))
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def step_checkpoints(directory: Path) -> list[Path]:
    """The ``step-NNNNNNNN.pt`` checkpoints in ``directory``, newest first."""
    return sorted(directory.glob("step-*.pt"), reverse=True)


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run: ``last.pt``, or, when that is truncated or
    corrupt, the newest good ``step-*.pt`` (with a warning). ``None`` when there is none."""
    directory = checkpoint_path(run_dir).parent
    candidates = [checkpoint_path(run_dir), *step_checkpoints(directory)]
    broken, tried = [], set()
    for path in candidates:
        if path.is_symlink() and not path.exists():
            broken.append(f"{path} is a dangling link (to {os.readlink(path)})")
            continue
        if not path.is_file():
            continue
        stat = path.stat()
        inode = (stat.st_dev, stat.st_ino)
        if inode in tried:  # last.pt is a link to the newest step file: read once
            continue
        tried.add(inode)
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            broken.append(str(err))
            continue
        if broken:
            warnings.warn(
                f"{'; '.join(broken)}; resuming from {path} instead",
                RuntimeWarning,
                stacklevel=2,
            )
        return path, state
    if broken:
        raise CheckpointError(f"no loadable checkpoint in {directory}: {'; '.join(broken)}")
    return None


class Checkpointer:
    """The trainer's checkpoint component: saves its components' states when due and keeps
    the latest.

    A checkpoint is ``{name: component.state_dict()}`` over ``components`` (each a
    :class:`Stateful`), and :meth:`restore` hands each its own entry back, in the order given:
    the checkpointer reads none of them. A save is due every ``every_steps`` steps, at the end
    of every epoch, at the last step of a ``fit`` call (the run's end, or an early stop), and
    when the caller asks for ``best``. Each save writes ``checkpoints/step-NNNNNNNN.pt``
    atomically and points ``last.pt`` (and ``best.pt`` when asked) at it; only the newest
    ``keep`` step files stay, and files of later steps than the one saved (left by a run
    resumed from an earlier checkpoint) are removed. Every process calls :meth:`save` when a
    save is due (gathering sharded state is collective); only the process with ``enabled``
    writes.
    """

    def __init__(
        self,
        run_dir: str | Path,
        components: Mapping[str, Stateful],
        *,
        every_steps: int,
        steps_per_epoch: int,
        keep: int = 2,
        enabled: bool = True,
        before_save: Callable[[], None] | None = None,
    ) -> None:
        self.path = checkpoint_path(run_dir)
        self.before_save = before_save
        """Called on every process when a save is due, before the state is taken (the trainer
        checks there that it is not saving a diverged state)."""
        self.components = dict(components)
        self.every_steps = every_steps
        self.steps_per_epoch = steps_per_epoch
        self.keep = keep
        self.enabled = enabled
        self.last_saved = 0
        """The step of this run's newest checkpoint (saved, or resumed from); 0 before any."""

    def state_dict(self) -> dict[str, Any]:
        """Every component's state, by name (every process must call it)."""
        return {name: component.state_dict() for name, component in self.components.items()}

    def restore(self, path: Path, state: dict[str, Any] | None = None) -> None:
        """Give every component its state from the checkpoint ``path`` (read from it unless
        ``state`` is given; a checkpoint of the earlier layout is converted first).

        A missing component, or a state its component refuses, is one
        :class:`CheckpointError` naming the file.
        """
        state = state if state is not None else load_checkpoint(path)
        try:
            state = upgrade_checkpoint(state, path)
        except _REFUSED as err:
            raise CheckpointError(f"checkpoint {path} is not a run's checkpoint ({err})") from None
        missing = [name for name in self.components if name not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} holds no {', '.join(missing)} state")
        for name, component in self.components.items():
            try:
                component.load_state_dict(state[name])
            except _REFUSED as err:
                raise mismatch(path, f"{name}: {_first_line(err)}") from None

    def should_save(self, step: int, *, last_step: bool = False) -> bool:
        """True when the state after step ``step`` (1-based) is to be saved."""
        return last_step or step % self.every_steps == 0 or step % self.steps_per_epoch == 0

    def save(self, step: int, *, last_step: bool = False, best: bool = False) -> bool:
        """Write the checkpoint if it is due after step ``step``; True when it was due."""
        due = best or self.should_save(step, last_step=last_step)
        if due:
            if self.before_save is not None:
                self.before_save()
            state = self.state_dict()
            self.last_saved = step
            if self.enabled:
                written = self.path.parent / f"step-{step:08d}.pt"
                save_checkpoint(written, state)
                _link(written, self.path)
                if best:
                    _link(written, self.path.with_name("best.pt"))
                files = step_checkpoints(self.path.parent)
                # A later step's file is from a timeline this run left (it resumed from an
                # earlier checkpoint, or under another world size): it must never outrank
                # this save, in keeping or in ``load_latest``'s fallback.
                abandoned = [p for p in files if p.name > written.name]
                current = [p for p in files if p.name <= written.name]
                for stale in abandoned + current[self.keep :]:
                    stale.unlink()
                _fsync_directory(self.path.parent)
        return due

    def link_best(self, step: int) -> None:
        """Point ``best.pt`` at the saved checkpoint of step ``step`` (the final step, once its
        probes show it is the best): saving comes before evaluating at the end of a run."""
        saved = self.path.parent / f"step-{step:08d}.pt"
        source = saved if saved.is_file() else self.path  # a run resumed from elsewhere
        if self.enabled and source.is_file():
            _link(source, self.path.with_name("best.pt"))
            _fsync_directory(self.path.parent)
