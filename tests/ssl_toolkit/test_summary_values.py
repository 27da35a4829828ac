"""``summary.json`` read back by a resume at the end: what is not of its type is computed
again or left as this session has it, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_toolkit.evaluation import Probes
from ssl_toolkit.report import TrainResult, kept_probes

WHOLE = {"knn_top1": 0.5, "linear_top1": 0.625, "linear_top1_few_labels": 0.25}


def test_whole_probes_are_kept() -> None:
    assert kept_probes({**WHOLE, "labels_per_class": 10}) == Probes(**WHOLE, labels_per_class=10)


@pytest.mark.parametrize(
    "changed",
    [
        {"knn_top1": "<script>alert(3)</script>"},
        {"linear_top1": None},
        {"linear_top1_few_labels": True},
        {"knn_top1": 10**400},
        {"labels_per_class": "<img src=x onerror=alert(4)>"},
        {"labels_per_class": 2.5},
        {"labels_per_class": True},
    ],
)
def test_probes_of_the_wrong_type_are_computed_again(changed: dict) -> None:
    assert kept_probes({**WHOLE, "labels_per_class": 10, **changed}) is None


def test_training_numbers_that_are_no_numbers_are_not_taken() -> None:
    result = TrainResult(
        steps=4,
        epochs=1.0,
        final_loss=2.0,
        knn_top1=None,
        images_per_s=9.0,
        seconds=3.0,
        run_dir=Path("run"),
    )
    earlier = {"final_loss": 10**400, "images_per_s": "<b>fast</b>", "seconds": 12}
    kept = result.with_training_of(earlier)
    assert (kept.final_loss, kept.images_per_s, kept.seconds) == (2.0, 9.0, 12.0)
