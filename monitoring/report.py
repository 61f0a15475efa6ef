"""The monitoring report: one self-contained HTML page, a PNG summary and a JSON result.

Figures are drawn with matplotlib's object API (no pyplot state, Agg canvas), PNGs embedded in the
page as data URIs so the HTML is one file that can be mailed or stored next to the JSON.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from fraud_common import storage
from fraud_common.settings import Settings
from monitoring.config import DriftThresholds
from monitoring.drift import ColumnDrift
from monitoring.feedback import RealizedMetrics

BAND_COLOURS = {"stable": "#2e7d32", "moderate": "#f9a825", "major": "#c62828"}
REFERENCE_COLOUR, WINDOW_COLOUR = "#9e9e9e", "#1565c0"
RESULT_FILE, SUMMARY_FILE, REPORT_FILE = "result.json", "summary.png", "report.html"


@dataclass
class MonitorResult:
    """Everything the report shows; ``to_dict`` is the JSON result."""

    window_start: str
    window_end: str
    log_uri: str
    reference_uri: str
    rows: int
    reference_rows: int
    model_versions: dict[str, int]
    sample_rates: list[float]
    thresholds: DriftThresholds
    columns: list[ColumnDrift]
    score_column: str | None  # the name of the score's entry in ``columns``, if compared
    notes: list[str] = field(default_factory=list)
    overall: RealizedMetrics | None = None
    buckets: list[RealizedMetrics] = field(default_factory=list)
    labels_matched: int = 0
    labels_total: int = 0
    hourly_rows: list[tuple[str, int]] = field(default_factory=list)
    score_histogram: dict[str, list[float]] = field(default_factory=dict)

    @property
    def drifted(self) -> list[str]:
        """Names of the columns that raise the alert."""
        return [c.name for c in self.columns if c.drifted]

    def to_dict(self) -> dict:
        """The JSON result."""
        from dataclasses import asdict

        return {
            "drift": bool(self.drifted),
            "drifted_columns": self.drifted,
            "window": {"start": self.window_start, "end": self.window_end},
            "log_uri": self.log_uri,
            "reference_uri": self.reference_uri,
            "rows": self.rows,
            "reference_rows": self.reference_rows,
            "model_versions": self.model_versions,
            "sample_rates": self.sample_rates,
            "thresholds": asdict(self.thresholds),
            "columns": [c.to_dict() for c in self.columns],
            "notes": self.notes,
            "performance": None
            if self.overall is None
            else {
                "labels_total": self.labels_total,
                "labels_matched": self.labels_matched,
                "overall": self.overall.to_dict(),
                "buckets": [b.to_dict() for b in self.buckets],
            },
            "hourly_rows": self.hourly_rows,
        }


def _png(figure: Figure) -> bytes:
    sink = io.BytesIO()
    figure.savefig(sink, format="png", dpi=110, bbox_inches="tight")
    return sink.getvalue()


def summary_figure(result: MonitorResult) -> Figure:
    """PSI and KS D per column against their thresholds: the one picture to look at first."""
    columns = result.columns[::-1]  # top of the chart = first column
    names = [c.name for c in columns]
    figure = Figure(figsize=(11, 0.32 * len(columns) + 1.6))
    psi_axes, ks_axes = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(columns))
    t = result.thresholds
    psi_axes.barh(y, [c.psi for c in columns], color=[BAND_COLOURS[c.psi_band] for c in columns])
    for edge, label in ((t.psi_moderate, "moderate"), (t.psi_alert, "major")):
        psi_axes.axvline(edge, color="black", linestyle="--", linewidth=0.8)
        psi_axes.text(edge, len(columns) - 0.4, f" {label} {edge}", fontsize=8, va="bottom")
    psi_axes.set_yticks(y, names)
    psi_axes.set_xlabel("PSI (reference deciles)")
    ks_axes.barh(y, [c.ks_statistic for c in columns], color=["#c62828" if c.drifted else WINDOW_COLOUR for c in columns])
    ks_axes.axvline(t.ks_min_statistic, color="black", linestyle="--", linewidth=0.8)
    ks_axes.set_xlabel(f"KS statistic D (alert at >= {t.ks_min_statistic} with p < {t.ks_alpha})")
    verdict = f"DRIFT ALERT: {', '.join(result.drifted)}" if result.drifted else "No drift"
    figure.suptitle(
        f"{verdict}\n{result.rows:,} predictions scored {result.window_start[:19]} to {result.window_end[:19]} UTC", fontsize=10
    )
    return figure


def distributions_figure(result: MonitorResult) -> Figure:
    """Per column: the reference's and the window's share of each reference decile bin (what PSI compares)."""
    columns = result.columns
    ncols = 4
    nrows = int(np.ceil(len(columns) / ncols))
    figure = Figure(figsize=(13, 2.4 * nrows))
    axes = np.atleast_1d(figure.subplots(nrows, ncols)).ravel()
    for ax, column in zip(axes, columns):
        ref, cur = np.asarray(column.reference_shares), np.asarray(column.current_shares)
        x = np.flatnonzero((ref > 0) | (cur > 0))  # a 0/1 flag's bin above 1 is empty in both: not drawn
        ax.bar(np.arange(x.size) - 0.2, ref[x], width=0.4, color=REFERENCE_COLOUR, label="reference")
        ax.bar(np.arange(x.size) + 0.2, cur[x], width=0.4, color=WINDOW_COLOUR, label="window")
        ax.set_title(f"{column.name}\nPSI {column.psi:.3f}  D {column.ks_statistic:.3f}", fontsize=8,
                     color=BAND_COLOURS["major"] if column.drifted else "black")
        ax.set_xticks(np.arange(x.size), [_bin_label(column.edges, i) for i in x], fontsize=6, rotation=45)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def _bin_label(edges: list[float], i: int) -> str:
    """``<=e0``, ``<=e1``, ..., ``>e_last``: the bin's right edge (bins are closed on the right)."""
    return f"<={edges[i]:.3g}" if i < len(edges) else f">{edges[-1]:.3g}" if edges else "all"


def traffic_figure(result: MonitorResult) -> Figure:
    """Predictions per hour, and the score's distribution in the window and the reference."""
    figure = Figure(figsize=(12, 3))
    volume, scores = figure.subplots(1, 2)
    hours = [h for h, _ in result.hourly_rows]
    volume.bar(range(len(hours)), [n for _, n in result.hourly_rows], color=WINDOW_COLOUR)
    step = max(1, len(hours) // 8)
    volume.set_xticks(range(0, len(hours), step), [h[5:16] for h in hours[::step]], fontsize=7, rotation=30)
    volume.set_title("logged predictions per hour (UTC)", fontsize=9)
    hist = result.score_histogram
    if hist:
        edges = np.asarray(hist["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        if hist.get("reference"):
            scores.bar(centres, hist["reference"], width=width, color=REFERENCE_COLOUR, alpha=0.6, label="reference")
        scores.bar(centres, hist["window"], width=width, color=WINDOW_COLOUR, alpha=0.6, label="window")
        scores.set_yscale("log")
        scores.legend(fontsize=7)
    scores.set_title("fraud score (share of rows, log scale)", fontsize=9)
    figure.tight_layout()
    return figure


def performance_figure(result: MonitorResult) -> Figure:
    """Realized precision, recall and ROC-AUC per time bucket, with how many labels each rests on."""
    figure = Figure(figsize=(12, 3))
    metrics_axes, count_axes = figure.subplots(1, 2)
    x = np.arange(len(result.buckets))
    for name, colour in (("precision", "#6a1b9a"), ("recall", "#ef6c00"), ("roc_auc", "#2e7d32")):
        values = [getattr(b, name) for b in result.buckets]
        metrics_axes.plot(x, values, marker="o", color=colour, label=name)
    metrics_axes.set_ylim(0, 1.05)
    metrics_axes.legend(fontsize=7)
    labels = [b.start[5:16] for b in result.buckets]
    step = max(1, len(labels) // 8)
    for ax in (metrics_axes, count_axes):
        ax.set_xticks(x[::step], labels[::step], fontsize=7, rotation=30)
    metrics_axes.set_title("realized metrics by scoring time (UTC)", fontsize=9)
    count_axes.bar(x, [b.labelled for b in result.buckets], color=REFERENCE_COLOUR, label="labelled")
    count_axes.bar(x, [b.positives for b in result.buckets], color="#c62828", label="fraud")
    count_axes.legend(fontsize=7)
    count_axes.set_title("labels per bucket", fontsize=9)
    figure.tight_layout()
    return figure


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def render_html(result: MonitorResult, summary_png: bytes) -> str:
    """The report page."""
    t = result.thresholds
    alert = bool(result.drifted)
    rows = "\n".join(
        f"<tr class='{'alert' if c.drifted else ''}'><td>{html.escape(c.name)}</td>"
        f"<td style='color:{BAND_COLOURS[c.psi_band]}'>{c.psi:.4f} ({c.psi_band})</td>"
        f"<td>{c.ks_statistic:.4f}</td><td>{c.ks_pvalue:.2e}</td><td>{_fmt(c.wasserstein, '.4g')}</td>"
        f"<td>{_fmt(c.wasserstein_in_std)}</td><td>{c.reference_mean:.4g}</td><td>{c.current_mean:.4g}</td>"
        f"<td>{c.current_missing}</td><td>{html.escape('; '.join(c.reasons)) or 'no'}</td></tr>"
        for c in result.columns
    )
    performance = "<p>No labels yet: run <code>fraud-detection feedback --labels FILE</code> when they arrive.</p>"
    if result.overall is not None:
        o = result.overall
        bucket_rows = "\n".join(
            f"<tr><td>{html.escape(b.start)}</td><td>{b.labelled}</td><td>{b.positives}</td><td>{b.flagged}</td>"
            f"<td>{_fmt(b.precision)}</td><td>{_fmt(b.recall)}</td><td>{_fmt(b.roc_auc)}</td></tr>"
            for b in result.buckets
        )
        performance = (
            f"<p>{result.labels_matched:,} of the window's {result.rows:,} predictions have a label "
            f"({result.labels_total:,} labels in the store). Over all of them: precision {_fmt(o.precision)}, "
            f"recall {_fmt(o.recall)} at the served decision, ROC-AUC {_fmt(o.roc_auc)}. Labels arrive late, so "
            f"recent buckets rest on fewer labels.</p>"
            + (_img(_png(performance_figure(result)), "realized metrics") if result.buckets else "")
            + "<table><tr><th>bucket start</th><th>labelled</th><th>fraud</th><th>flagged</th><th>precision</th>"
            f"<th>recall</th><th>ROC-AUC</th></tr>{bucket_rows}</table>"
        )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    versions = ", ".join(f"{html.escape(v)} ({n:,} rows)" for v, n in result.model_versions.items()) or "–"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Fraud model monitoring {html.escape(result.window_end)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1300px; color: #212121; }}
.banner {{ padding: 0.8em 1em; border-radius: 6px; color: white; font-size: 1.2em;
          background: {'#c62828' if alert else '#2e7d32'}; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, th:first-child, td:last-child {{ text-align: left; }}
tr.alert td {{ background: #ffebee; }}
img {{ max-width: 100%; }}
code {{ background: #f5f5f5; padding: 0 0.2em; }}
</style></head><body>
<div class="banner">{'Drift alert: ' + html.escape(', '.join(result.drifted)) if alert else 'No drift'}</div>
<p>{result.rows:,} logged predictions scored from {html.escape(result.window_start)} to
{html.escape(result.window_end)} (log <code>{html.escape(result.log_uri)}</code>, sample rates
{', '.join(f'{r:g}' for r in result.sample_rates) or '–'}; model versions {versions}), compared with
{result.reference_rows:,} reference rows (<code>{html.escape(result.reference_uri)}</code>).</p>
{_img(summary_png, 'PSI and KS per column')}
<h2>How to read it</h2>
<p><b>PSI</b> (population stability index) = &Sigma; (window share &minus; reference share) &times;
ln(window share / reference share) over bins cut at the reference's deciles, so each bin holds a
tenth of the reference however skewed the column (repeated cut points, as for 0/1 flags, merge
bins). An empty bin's share counts as {t.epsilon:g}. Conventional bands: below {t.psi_moderate}
the population is stable; {t.psi_moderate} to {t.psi_alert} a moderate shift worth a look;
{t.psi_alert} and above a major shift. <b>KS</b>: the two-sample Kolmogorov-Smirnov statistic D is
the largest gap between the two cumulative distributions (for a flag, the change in its share of
ones). With many rows any shift is "significant", so KS alerts only when p &lt; {t.ks_alpha}
<i>and</i> D &ge; {t.ks_min_statistic}. <b>Wasserstein</b> is the average distance values must move
to turn one distribution into the other, also shown in reference standard deviations; it is for
reading, not alerting. A column raises the alert when PSI &ge; {t.psi_alert} or the KS rule holds.</p>
<h2>Columns</h2>
<table><tr><th>column</th><th>PSI (band)</th><th>KS D</th><th>KS p</th><th>Wasserstein</th>
<th>W / ref std</th><th>ref mean</th><th>window mean</th><th>missing</th><th>alert</th></tr>
{rows}</table>
<h2>Distributions per reference decile bin</h2>
{_img(_png(distributions_figure(result)), 'shares per decile bin')}
<h2>Traffic and score</h2>
{_img(_png(traffic_figure(result)), 'traffic and score')}
<h2>Realized performance</h2>
{performance}
{'<h2>Notes</h2><ul>' + notes + '</ul>' if notes else ''}
</body></html>
"""


def write_report(result: MonitorResult, out_uri: str, settings: Settings) -> dict[str, str]:
    """Write report.html, summary.png and result.json under ``out_uri``; returns their URIs."""
    summary_png = _png(summary_figure(result))
    paths = {
        "html": storage.join(out_uri, REPORT_FILE),
        "png": storage.join(out_uri, SUMMARY_FILE),
        "json": storage.join(out_uri, RESULT_FILE),
    }
    storage.write_bytes(paths["png"], summary_png, settings)
    storage.write_bytes(paths["html"], render_html(result, summary_png).encode(), settings)
    # The JSON last: its presence says the report is complete.
    storage.write_bytes(paths["json"], json.dumps(result.to_dict(), indent=2).encode(), settings)
    return paths
