"""The Markdown report and bar chart: this run next to the published figures.

The published rows are the code-interpreter benchmark tables of the Qwen-7B-Chat model card (the
same tables appear in the Qwen-Agent benchmark README): Qwen-7B-Chat is the version updated after
2023-09-25; GPT-4 and GPT-3.5 rows are as published there, not measured by us.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = [  # (label, metrics path)
    ("Math acc. (GSM8K)", ("accuracy", "math_gsm8k")),
    ("Vis-Hard acc.", ("accuracy", "visualization_hard")),
    ("Vis-Easy acc.", ("accuracy", "visualization_easy")),
    ("Math exec.", ("executable_rate", "math")),
    ("Vis exec.", ("executable_rate", "visualization")),
    ("General exec.", ("executable_rate", "general")),
]
PUBLISHED: dict[str, list[float | None]] = {  # same order as COLUMNS
    "Qwen-7B-Chat": [41.9, 40.5, 54.4, 82.4, 64.4, 67.2],
    "GPT-4": [82.8, 66.7, 60.8, 91.9, 85.9, 82.8],
    "GPT-3.5": [47.3, 33.3, 55.7, 89.2, 65.0, 74.1],
}
SOURCE = ("the code-interpreter benchmark tables of the Qwen-7B-Chat model card (Qwen-7B-Chat: the version "
          "updated after 2023-09-25; GPT-4 and GPT-3.5 rows as published in the Qwen-7B-Chat model card)")


def run_values(metrics: dict[str, Any]) -> list[float | None]:
    return [metrics.get(a, {}).get(b) for _, (a, b) in COLUMNS]


def _cell(value: float | None, label: str, metrics: dict[str, Any]) -> str:
    if value is not None:
        return f"{value:.1f}"
    if label.startswith("Vis-") and "visualization_accuracy" in metrics:
        return "not measured"
    return "—"


def write_report(out: Path, metrics: dict[str, Any], model: str, chart: Path | None) -> Path:
    ours = run_values(metrics)
    header = "| Model | " + " | ".join(label for label, _ in COLUMNS) + " |"
    lines = [
        "# Code-interpreter benchmark", "",
        f"Model: `{model}`; {metrics['records']} records; all code ran in the jupybox sandbox.", "",
        "Accuracy and executable rate in %.", "",
        header, "|" + "---|" * (len(COLUMNS) + 1),
        f"| **this run** ({model}) | " + " | ".join(_cell(v, c[0], metrics) for v, c in zip(ours, COLUMNS)) + " |",
    ]
    for name, values in PUBLISHED.items():
        lines.append(f"| {name} ({'published' if name.startswith('Qwen') else 'as published'}) | "
                     + " | ".join("—" if v is None else f"{v:.1f}" for v in values) + " |")
    counts = metrics["counts"]
    lines += [
        "", f"Published rows: from {SOURCE}. They were measured on the full benchmark; a small or partial run is "
        "not comparable figure for figure.", "",
        "## Details", "",
        "| Tag | records | executable | missing code | executable rate | missing-code rate |", "|---|---|---|---|---|---|",
    ]
    for tag in ("math", "visualization", "general"):
        c = counts[tag]
        rate, miss = metrics["executable_rate"][tag], metrics["missing_code_rate"][tag]
        lines.append(f"| {tag} | {c['all']} | {c['executable']} | {c['missing_code']} | "
                     f"{'—' if rate is None else f'{rate:.1f}'} | {'—' if miss is None else f'{miss:.1f}'} |")
    g = counts["gsm8k"]
    lines += ["", f"GSM8K: {g['correct']} correct of {g['all']} ({g['no_number']} without a number).",
              "Visualization judged right: " + ", ".join(f"{k} {counts['visualization_' + k]['right']} of "
                                                          f"{counts['visualization_' + k]['all']}" for k in ("hard", "easy")) + "."]
    if "visualization_accuracy" in metrics:
        lines.append(f"Visualization accuracy: {metrics['visualization_accuracy']}.")
    lines.append("Time limits of the executability check: 10 s for math and visualization, 60 s for general "
                 "(the reference sets none for general).")
    if chart is not None:
        lines += ["", f"![comparison]({chart.name})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_chart(out: Path, metrics: dict[str, Any], model: str) -> Path | None:
    """A grouped bar chart of the report's table; None (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install 'jupybox[eval]')")
        return None
    rows = {f"this run ({model})": run_values(metrics), **{f"{k} (published)": v for k, v in PUBLISHED.items()}}
    labels = [label for label, _ in COLUMNS]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, (name, values) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        heights = [v or 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        for bar, v in zip(bars, values):
            ax.annotate("n/m" if v is None else f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("Code-interpreter benchmark (n/m: not measured)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
