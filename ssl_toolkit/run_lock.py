"""One run per directory at a time: an exclusive lock the main process holds for the whole run.

Two runs writing one directory interleave their checkpoints, and the later one's save removes
the other's step files as leftovers. :class:`RunLock` takes ``fcntl.flock`` on a lock file in
the run directory. The operating system releases it when the holder exits or is killed, so a
lock left behind by a dead run never blocks the next one. The file holds the holder's pid, so
a second run can name it; it is opened without following links, so a symbolic link planted at
its name is refused rather than its target truncated. Taking the lock, a run removes what the
writes of a run killed in the directory left: their temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import warnings
from pathlib import Path
from types import TracebackType

from ssl_toolkit.checkpoint import checkpoint_path, remove_partial_writes

__all__ = ["LOCK_FILE", "RunDirectoryError", "RunLock", "prepare_run_dir"]

LOCK_FILE = ".run.lock"
"""The lock file's name in a run directory."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used: it is not a writable folder, or another run holds it."""


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), or raise :class:`RunDirectoryError` saying why it
    cannot be one: a file is in the way or the file system refuses."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirectoryError(f"trainer.output_dir: {run_dir} is a file, not a folder") from None
    except NotADirectoryError:
        raise RunDirectoryError(
            f"trainer.output_dir: {run_dir} cannot be created: a part of its path is a file"
        ) from None
    except OSError as err:
        raise RunDirectoryError(
            f"trainer.output_dir: {run_dir} cannot be created ({err.strerror})"
        ) from None


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir``; use as a context manager or call
    :meth:`acquire` and :meth:`release`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Create the run directory and take its lock, or raise :class:`RunDirectoryError`
        naming the directory and the pid of the run that holds it (or the lock file, when it
        is a symbolic link). Once it holds the lock, no other run writes in the directory: the
        temporary files of killed writes there and in its checkpoints folder are removed."""
        if self._fd is not None:
            return
        prepare_run_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunDirectoryError(
                    f"trainer.output_dir: {self.path} is a symbolic link, not the run's lock "
                    "file; remove it"
                ) from None
            raise RunDirectoryError(
                f"trainer.output_dir: {self.run_dir} is not writable ({err.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryError(
                f"trainer.output_dir: {self.run_dir} is in use by another run (pid {holder}); "
                "wait for it to end or choose another output_dir"
            ) from None
        except OSError as err:  # a file system without flock (Lustre without -o flock, ...)
            os.close(fd)
            warnings.warn(
                f"{self.run_dir} cannot be locked ({err.strerror}): nothing stops a second run "
                "from writing into it while this one runs",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        remove_partial_writes(self.run_dir)
        remove_partial_writes(checkpoint_path(self.run_dir).parent)

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race with a new holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
