"""``report.html``: what a run did, in one file that needs no network.

Read from the run directory alone (``metrics.jsonl``, ``summary.json``, ``config.yaml``), so
that it can be drawn for any run, finished, killed or resumed (``scripts/report.py RUN_DIR``):

- the loss, the lr, images/s and the kNN accuracy against the step, with a line where a
  session resumed and where one was preempted;
- the LARS trust ratios as a heatmap, the adapted parameters in model order against the
  steps, on a log colour scale (161 rows on a ResNet-50, which no set of line charts shows),
  and the last ratios as bars;
- the end-of-run probes, trained against random init;
- the resolved config.

The plots are matplotlib's (headless ``Agg``), inlined as base64 PNG. Every text read from
the run's files is escaped (a file holds what anyone wrote to it), and a value of the wrong
type is shown as text or left out, never a crash.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from optim.errors import short_repr
from ssl_toolkit.checkpoint import atomic_write
from ssl_toolkit.metrics_file import METRICS_FILE, RESUMED_KEY, MetricsRows, scan_metrics
from ssl_toolkit.report import SUMMARY_FILE, finite_number, read_summary

__all__ = [
    "HEATMAP_FILE",
    "REPORT_FILE",
    "ReportNotWritable",
    "TrustRatios",
    "heatmap",
    "trust_ratios",
    "write_report",
]

REPORT_FILE = "report.html"
"""The report's name in the run directory."""
HEATMAP_FILE = "trust_ratio_heatmap.png"
"""The heatmap alone, beside the report (what W&B gets as ``lars/trust_ratio_heatmap``)."""
_RATIO = "lars/trust_ratio/"
_CURVES = (
    ("train/loss", "loss"),
    ("train/lr", "learning rate"),
    ("train/img_per_s", "images/s"),
    ("knn/top1", "kNN top-1"),
)
_FRACTIONS = {"knn/top1"}
"""Curves of fractions, drawn as percentages."""


class ReportNotWritable(OSError):
    """The report (or the heatmap beside it) could not be written; ``filename`` is where."""


class TrustRatios:
    """The trust ratios a run logged: ``names`` (model order), ``steps``, and ``values``, one
    row per name and one column per step (``nan`` where a step lacks a name)."""

    def __init__(self, names: list[str], steps: list[int], values: list[list[float]]) -> None:
        self.names, self.steps, self.values = names, steps, values


def trust_ratios(rows: list[dict[str, Any]]) -> TrustRatios | None:
    """The trust ratios in ``rows`` (of ``metrics.jsonl``); ``None`` when there are none. A
    step logged twice (a resumed session's first step) keeps its last row."""
    by_step: dict[int, dict[str, float]] = {}
    names: dict[str, None] = {}
    for row in rows:
        ratios = {k[len(_RATIO) :]: v for k, v in row.items() if k.startswith(_RATIO)}
        if ratios:
            by_step[row["global_step"]] = ratios
            names.update(dict.fromkeys(ratios))
    if not by_step:
        return None
    steps = sorted(by_step)
    nan = float("nan")
    values = [
        [nan if (v := finite_number(by_step[s].get(name))) is None else v for s in steps]
        for name in names
    ]
    return TrustRatios(list(names), steps, values)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _curves(rows: list[dict[str, Any]], plt: Any) -> bytes | None:
    """The curves against the step, resumes and preemptions marked; ``None`` without rows."""
    from matplotlib.ticker import PercentFormatter

    shown = [(k, label) for k, label in _CURVES if any(k in r for r in rows)]
    if not shown:
        return None
    figure, axes = plt.subplots(len(shown), 1, figsize=(8, 2.1 * len(shown)), sharex=True)
    axes = [axes] if len(shown) == 1 else list(axes)
    resumes = [r["global_step"] for r in rows if RESUMED_KEY in r]
    stops = [r["global_step"] for r in rows if "train/preempted_at" in r]
    for ax, (key, label) in zip(axes, shown, strict=True):
        points = [
            (r["global_step"], v) for r in rows if (v := finite_number(r.get(key))) is not None
        ]
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None
        )
        ax.set_ylabel(label)
        if key in _FRACTIONS:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        for step in resumes:
            ax.axvline(step, color="tab:green", linestyle="--", linewidth=1)
        for step in stops:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("step")
    if resumes or stops:
        axes[0].set_title("dashed green: resumed; dotted red: preempted", fontsize=8)
    data = _png(figure)
    plt.close(figure)
    return data


def heatmap(ratios: TrustRatios, plt: Any) -> bytes:
    """The trust-ratio heatmap as PNG: parameters (model order, top to bottom) against steps,
    log colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    values = np.array(ratios.values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    masked = np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)
    height = max(2.5, 0.13 * len(ratios.names) + 1.2)
    figure, ax = plt.subplots(figsize=(9, height))
    image = ax.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=low, vmax=max(high, low * 1.0001)),
    )
    ax.set_yticks(range(len(ratios.names)), ratios.names, fontsize=6, parse_math=False)
    ticks = range(0, len(ratios.steps), -(-len(ratios.steps) // 10))  # every k-th, at most 10
    ax.set_xticks(ticks, [str(ratios.steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("LARS trust ratio per adapted parameter (log scale)", fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    data = _png(figure)
    plt.close(figure)
    return data


def _last_ratios(ratios: TrustRatios, plt: Any) -> bytes | None:
    """The ratios of the last logged step, one bar per parameter, log scale; ``None`` when
    none is positive (a log scale would have nothing to show)."""
    last = [row[-1] for row in ratios.values]
    if not any(value > 0 for value in last):  # nan > 0 is False
        return None
    figure, ax = plt.subplots(figsize=(9, max(2.5, 0.13 * len(ratios.names) + 1.0)))
    ax.barh(range(len(last)), last, color="tab:blue")
    ax.set_yticks(range(len(ratios.names)), ratios.names, fontsize=6, parse_math=False)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"trust ratio at step {ratios.steps[-1]}")
    ax.grid(axis="x", alpha=0.3)
    data = _png(figure)
    plt.close(figure)
    return data


def _percent(value: Any) -> str:
    number = finite_number(value)
    return "-" if number is None else f"{100 * number:.2f}%"


def _probe_table(summary: dict[str, Any] | None) -> str:
    """The end-of-run probes, trained against random init, as an HTML table."""
    probes = (summary or {}).get("probes")
    if not isinstance(probes, dict) or "knn_top1" not in probes:
        return "<p>No end-of-run probes (the run has not finished, or has no labels).</p>"
    baseline = (summary or {}).get("baseline")
    baseline = baseline if isinstance(baseline, dict) else {}
    few = probes.get("labels_per_class")
    if few is None:
        few = "?"
    elif not isinstance(few, int) or isinstance(few, bool):
        few = short_repr(few)
    rows = [
        ("kNN", "knn_top1"),
        ("linear, all labels", "linear_top1"),
        (f"linear, {few} labels per class", "linear_top1_few_labels"),
    ]
    body = []
    for label, key in rows:
        trained, random = probes.get(key), baseline.get(key)
        both = (finite_number(trained), finite_number(random))
        gain = "-" if None in both else f"{100 * (both[0] - both[1]):+.2f}"
        body.append(
            f"<tr><td>{html.escape(label)}</td><td>{_percent(trained)}</td>"
            f"<td>{_percent(random)}</td><td>{gain}</td></tr>"
        )
    return (
        "<table><tr><th>probe</th><th>trained</th><th>random init</th><th>gain</th></tr>"
        + "".join(body)
        + "</table>"
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1000px; }
img { max-width: 100%; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
"""


def _facts(summary: dict[str, Any]) -> str:
    """The training numbers of ``summary.json``, one line; a value that is no number is shown
    as the text it is (cut short)."""
    facts = []
    for key in ("steps", "epochs", "final_loss", "images_per_s", "seconds"):
        value = summary.get(key)
        if value is None:
            continue
        if isinstance(value, float):
            facts.append(f"{key.replace('_', ' ')} {value:.4g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            facts.append(f"{key} {value}")
        else:
            facts.append(f"{key} {short_repr(value)}")
    return ", ".join(facts)


def _config_text(config: Path) -> str:
    """``config.yaml`` as text: a byte that is not UTF-8 shown as U+FFFD, never a failure."""
    if not config.is_file():
        return "(no config.yaml)"
    try:
        return config.read_bytes().decode(errors="replace")
    except OSError as error:
        return f"(config.yaml cannot be read: {error.strerror or error})"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (and the heatmap alone as :data:`HEATMAP_FILE`) from the
    run's files; returns the report's path. A run without rows yet gets a report that says so,
    and damaged lines of ``metrics.jsonl`` are counted on the page. ``out``: the report's path
    instead, for a run directory that cannot be written (the heatmap is then only inlined).
    Raises :class:`ReportNotWritable` when a write fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    rows, damaged = scan_metrics(metrics) if metrics.is_file() else MetricsRows([], 0)
    summary = read_summary(run_dir / SUMMARY_FILE)
    sections = [f"<h1>Run {html.escape(run_dir.name)}</h1>"]
    if summary:
        sections.append(f"<p>{html.escape(_facts(summary))}</p>")
    curves = _curves(rows, plt)
    sections.append("<h2>Training</h2>")
    sections.append(_image(curves, "training curves") if curves else "<p>No rows logged yet.</p>")
    if damaged:
        sections.append(f"<p>{damaged} damaged line(s) of {METRICS_FILE} left out.</p>")
    for key, what in ((RESUMED_KEY, "Resumed"), ("train/preempted_at", "Preempted")):
        steps = [str(r["global_step"]) for r in rows if key in r]
        if steps:
            sections.append(f"<p>{what} at step {html.escape(', '.join(steps))}.</p>")
    ratios = trust_ratios(rows)
    writes: list[tuple[Path, bytes]] = []
    if ratios is not None:
        map_png = heatmap(ratios, plt)
        if out is None:
            writes.append((run_dir / HEATMAP_FILE, map_png))
        sections.append("<h2>LARS trust ratios</h2>")
        sections.append(
            f"<p>{len(ratios.names)} adapted parameters, in model order, at "
            f"{len(ratios.steps)} logged steps.</p>"
        )
        sections.append(_image(map_png, "trust-ratio heatmap"))
        last = _last_ratios(ratios, plt)
        sections.append(
            _image(last, "last trust ratios")
            if last
            else f"<p>No positive trust ratio at step {ratios.steps[-1]}.</p>"
        )
    sections.append("<h2>Frozen features at the end</h2>")
    sections.append(_probe_table(summary))
    sections.append("<h2>Config</h2>")
    sections.append(f"<pre>{html.escape(_config_text(run_dir / 'config.yaml'))}</pre>")
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>'
        f"{html.escape(run_dir.name)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    path = run_dir / REPORT_FILE if out is None else Path(out)
    writes.append((path, page.encode()))
    for target, data in writes:
        try:
            atomic_write(target, lambda file, data=data: file.write(data))
        except OSError as error:
            raise ReportNotWritable(error.errno, error.strerror, str(target)) from error
    return path
