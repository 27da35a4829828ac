"""Every test keeps its indexes in a cache of its own, never in the user's."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_index_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """``$XDG_CACHE_HOME`` in a folder of the test's own (beside its ``tmp_path``, not in it),
    so that the per-user cache of listing and shard indexes starts empty and the user's is
    never written."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "ssl-toolkit"
