"""The images a run skipped because they do not decode (``data.skip_bad``), kept in the run
directory so that a user can find and fix them, and counted for the ``data/skipped`` log."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ssl_toolkit.checkpoint import open_append

__all__ = ["SKIPPED_FILE", "SkippedImages"]

SKIPPED_FILE = "skipped_images.txt"
"""The list's name in the run directory: one path a line, each once."""


class SkippedImages:
    """The list of skipped images of the run in ``run_dir``.

    A resumed run (``resumed``) keeps the paths its earlier sessions listed, so a path met
    again is not listed twice; a fresh run starts the list anew. Only the main process writes
    (``enabled``); the others give their paths to it.
    """

    def __init__(self, run_dir: Path, *, resumed: bool, enabled: bool = True) -> None:
        self.path = Path(run_dir) / SKIPPED_FILE
        self.enabled = enabled
        self._seen: dict[str, None] = {}  # insertion-ordered: the file's order
        if enabled and resumed and self.path.is_file() and not self.path.is_symlink():
            self._seen = dict.fromkeys(self.path.read_text().splitlines())
        elif enabled:
            self.path.unlink(missing_ok=True)  # an earlier run's list (or a link) is not ours
        self._written = len(self._seen)

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, paths: Iterable[str]) -> int:
        """List the paths not listed yet; returns how many images the run has skipped."""
        self._seen.update(dict.fromkeys(paths))
        if self.enabled and len(self._seen) > self._written:
            with open_append(self.path) as file:
                file.writelines(f"{path}\n" for path in list(self._seen)[self._written :])
            self._written = len(self._seen)
        return len(self._seen)
