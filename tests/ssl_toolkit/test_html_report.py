"""``report.html``: drawn at the end of a run and for any run directory, one file that needs
no network, with one heatmap row per adapted parameter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from scripts.report import main as report
from ssl_toolkit import html_report
from ssl_toolkit.html_report import HEATMAP_FILE, REPORT_FILE, trust_ratios, write_report
from ssl_toolkit.metrics_file import METRICS_FILE, RESUMED_KEY, read_metrics
from ssl_toolkit.trainer import Trainer
from tests.ssl_toolkit.test_cli import ROOT
from tests.ssl_toolkit.test_trainer import RecordingLogger, tiny_config


def _external_references(page: str) -> list[str]:
    """Everything in ``page`` a browser would fetch from elsewhere."""
    sources = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    return [s for s in sources if not s.startswith("data:")] + re.findall(r"url\(", page)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, RecordingLogger]:
    logger = RecordingLogger()
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("run")), logger=logger)
    trainer.fit()
    return trainer, logger


def test_a_finished_run_leaves_a_self_contained_report(finished) -> None:
    trainer, logger = finished
    page = (trainer.run_dir / REPORT_FILE).read_text()
    assert _external_references(page) == []
    assert page.count('src="data:image/png;base64,') == 3  # curves, heatmap, last ratios
    for text in ("LARS trust ratio", "random init", "linear, all labels", "method:"):
        assert text in page, text
    # One heatmap row per adapted parameter, in the optimizer's (the model's) order.
    adapted = list(trainer.optimizer.trust_ratios(adapted_only=True))
    ratios = trust_ratios(read_metrics(trainer.run_dir / METRICS_FILE))
    assert ratios.names == adapted and ratios.steps == [1, 4, 8, 12, 16]
    assert f"{len(adapted)} adapted parameters, in model order, at 5 logged steps" in page
    # W&B gets the heatmap as an image, at the last step.
    heatmap = trainer.run_dir / HEATMAP_FILE
    assert logger.images == [(16, "lars/trust_ratio_heatmap", heatmap)]
    assert (trainer.run_dir / HEATMAP_FILE).read_bytes().startswith(b"\x89PNG")


def test_the_script_draws_a_killed_run_and_a_resumed_one(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, checkpoint_every_steps=2)
    Trainer(cfg, logger=RecordingLogger()).fit(stop_at_step=5)
    run = Path(cfg.trainer.output_dir)
    (run / REPORT_FILE).unlink()
    (run / "summary.json").unlink()  # as a kill leaves it: no summary
    assert report([str(run)]) == 0
    page = (run / REPORT_FILE).read_text()
    assert "No end-of-run probes" in page and _external_references(page) == []
    resumed = Trainer(cfg, resume=run / "checkpoints" / "last.pt", logger=RecordingLogger())
    resumed.fit(stop_at_step=9)
    assert report([str(run)]) == 0
    assert "<p>Resumed at step 5.</p>" in (run / REPORT_FILE).read_text()


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert report([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"report: {tmp_path} has no {METRICS_FILE}: not a run directory\n"


def test_trust_ratios_keep_model_order_and_the_last_row_of_a_step() -> None:
    rows = [
        {"global_step": 4, "lars/trust_ratio/b": 0.5, "lars/trust_ratio/a": 0.25},
        {"global_step": 2, "train/loss": 1.0},
        {"global_step": 8, "lars/trust_ratio/b": 0.1, "lars/trust_ratio/a": 0.2},
        {"global_step": 8, "lars/trust_ratio/b": 0.3, "lars/trust_ratio/a": 0.4},
    ]
    ratios = trust_ratios(rows)
    assert ratios.names == ["b", "a"] and ratios.steps == [4, 8]
    assert ratios.values == [[0.5, 0.3], [0.25, 0.4]]
    assert trust_ratios([{"global_step": 1, "train/loss": 1.0}]) is None


def test_a_run_without_rows_gets_a_report_that_says_so(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text("")
    page = write_report(tmp_path).read_text()
    assert "No rows logged yet." in page and "(no config.yaml)" in page


PLANTED = ("<script>alert(3)</script>", "<img src=x onerror=alert(4)>")
"""Markup a run's files may hold: neither may come out live."""


class _Elements(HTMLParser):
    """Every element of a page and its attributes; the text outside tags."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _planted_run(folder: Path, baseline: object) -> Path:
    """A run directory (itself named in markup) whose every file holds markup in every key and
    value, and values of the wrong type where numbers belong."""
    script, img = PLANTED
    run = folder / img
    run.mkdir(parents=True)
    probes = {
        "knn_top1": script,
        "linear_top1": 0.5,
        "linear_top1_few_labels": [img],
        "labels_per_class": script,
        script: img,
    }
    summary = {
        script: img,
        "steps": script,
        "epochs": img,
        "final_loss": {script: img},
        "images_per_s": [script],
        "seconds": True,
        "knn_top1": img,
        "linear_top1": script,
        "linear_top1_few_labels": [img],
        "labels_per_class": script,
        "probes": probes,
        "baseline": baseline,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"global_step": script, RESUMED_KEY: script},  # a resume row whose step is markup
        {"global_step": 2, "train/loss": script, "train/lr": 0.1, script: img, img: 1.0},
        {"global_step": 3, RESUMED_KEY: script, "train/preempted_at": img, "knn/top1": img},
        {"global_step": 4, "lars/trust_ratio/" + script: 0.5, "lars/trust_ratio/$x^$": img},
        {"global_step": 5, "lars/trust_ratio/" + img: 10**400, "train/loss": 1e308 * 10},
    ]
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_bytes(f"{script}: {img}\nname: caf\xff\n".encode("latin-1"))
    return run


@pytest.mark.parametrize(
    "baseline",
    [PLANTED[0], {"knn_top1": PLANTED[1], "linear_top1": 0.25, PLANTED[0]: 1.0}],
    ids=["text", "mapping"],
)
def test_markup_in_every_file_stays_text(tmp_path: Path, baseline: object) -> None:
    run = _planted_run(tmp_path, baseline)
    assert report([str(run)]) == 0
    page = (run / REPORT_FILE).read_text()
    parsed = _Elements()
    parsed.feed(page)
    allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "img"}
    allowed |= {"table", "tr", "th", "td", "pre"}
    assert {tag for tag, _ in parsed.elements} <= allowed
    images = [attrs for tag, attrs in parsed.elements if tag == "img"]
    assert len(images) == 2  # the page's own: curves and heatmap (no last ratio to draw)
    for attrs in images:
        assert set(attrs) == {"alt", "src"}
        assert attrs["src"].startswith("data:image/png;base64,")
    assert not any(name.startswith("on") for _, attrs in parsed.elements for name in attrs)
    for planted in PLANTED:
        assert planted not in page  # only escaped
        assert planted in "".join(parsed.text)  # and shown as text where it is shown at all
    text = "".join(parsed.text)
    assert f"steps {PLANTED[0]!r}" in text  # a value of the wrong type, as the text it is
    assert f"linear, {PLANTED[0]!r} labels per class" in text
    assert "1 damaged line(s) of metrics.jsonl left out." in text
    assert "Resumed at step 3." in text and "Preempted at step 3." in text
    assert "No positive trust ratio at step 5." in text
    assert "name: caf\ufffd" in text  # config.yaml's byte that is not UTF-8


def test_the_report_goes_elsewhere_when_the_run_directory_cannot_be_written(
    capsys, monkeypatch, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text('{"global_step": 1, "lars/trust_ratio/w": 0.5}\n')
    write = html_report.atomic_write

    def read_only(path, data):  # root writes whatever the mode bits say: refuse as a mount would
        if Path(path).parent == run:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, data)

    monkeypatch.setattr(html_report, "atomic_write", read_only)
    assert report([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"report: {run} is not writable (Permission denied); "
        "write the report elsewhere with --out PATH\n"
    )
    out = tmp_path / "elsewhere" / "run.html"
    assert report([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    assert "LARS trust ratios" in out.read_text()
    assert sorted(p.name for p in run.iterdir()) == [METRICS_FILE]
    (tmp_path / "file").write_text("")
    assert report([str(run), "--out", str(tmp_path / "file" / "run.html")]) == 2
    assert capsys.readouterr().err.startswith(f"report: cannot write {tmp_path / 'file'}")


def _read_only_mount_works(folder: Path) -> bool:
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && ! touch "$1/x"'
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(folder)], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_a_read_only_run_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The real case: the run directory on a read-only mount (a private one, in a namespace
    of its own, which also stops root)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text('{"global_step": 1, "train/loss": 1.0}\n')
    if not _read_only_mount_works(run):
        pytest.skip("no read-only bind mount in a user namespace here")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    command = [sys.executable, str(ROOT / "scripts" / "report.py"), str(run)]
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(run), *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"report: {run} is not writable (Read-only file system); "
        "write the report elsewhere with --out PATH\n"
    )
    assert sorted(p.name for p in run.iterdir()) == [METRICS_FILE]
