"""The curves of a run's report: ``metrics.csv`` read into series, grouped into charts, drawn as PNG bytes.

Grouping (:func:`group_charts`), one section each, in this order:

- **Reward and KL** (RL): ``train/score`` with its parts ``train/score_*`` on one axis; ``train/kl``;
  ``train/kl_coef``.
- **Gold against proxy** (RL with a gold reward): each ``gold/<x>`` beside its proxy (``train/<x>``, else
  ``train/score``), the proxy on the left axis and the gold on the right.
- **Training and validation**: ``train/<x>`` and ``val/<x>`` on one axis for each ``<x>`` (loss and perplexity
  first); a ``val/perplexity`` without a logged training perplexity gets ``exp(train/loss)`` beside it; ``lr``.
- **Evaluation**: every ``eval/*`` series, except the ``eval/<x>_before`` / ``eval/<x>_after`` pairs, which are
  the before/after table's (:func:`before_after_scores`).
- **Throughput**: the ``throughput/*tokens_per_s`` series on one axis, every other series on its own.
- **Memory**: the ``memory/*_gib`` series on one axis, every other series on its own.
- **Other**: any other numeric series (``time/*``, ``test/*`` ...); ``cost/*`` goes to the cost table instead.

Drawing: matplotlib's Agg canvas on a ``Figure`` (no pyplot state, no display). Series of 50 points or more are drawn
faint, with a centred moving mean over 1/25 of the points in bold; a chart whose values are all at least 1 and span
more than 50x is drawn on a log axis (perplexity early in training).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Series = tuple[list[float], list[float]]  # (steps, values), sorted by step, one value per step

SECTIONS = ("Reward and KL", "Gold against proxy", "Training and validation", "Evaluation", "Throughput", "Memory",
            "Other")
BEFORE_AFTER = re.compile(r"eval/(.+)_(before|after)")
NOT_CURVES = ("step", "epoch")
SMOOTH_FROM = 50  # points: below this every point is visible and a moving mean would hide little
COLOURS = {"train": "#2563eb", "val": "#ea580c", "gold": "#16a34a"}
PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04", "#4b5563")


@dataclass
class Line:
    """One series of a chart: its legend label, points, and role (colour and drawing style)."""

    label: str
    steps: list[float]
    values: list[float]
    role: Literal["train", "val", "gold", "derived", "other"] = "other"


@dataclass
class Chart:
    """One plot: ``lines`` on the left axis, ``right`` (gold against proxy) on a second axis."""

    title: str
    lines: list[Line]
    right: list[Line] = field(default_factory=list)
    ylabel: str = ""


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Every numeric column of a Lightning ``metrics.csv`` as (steps, values), in column order. Rows of one step
    logged more than once (several log calls a step, or an interrupted run's rows before a resume's) keep the last
    value; empty and non-numeric cells are skipped."""
    by_name: dict[str, dict[float, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is None:
                continue
            for name, cell in row.items():
                value = _number(cell)
                if name is None or name in NOT_CURVES or value is None:
                    continue
                by_name.setdefault(name, {})[step] = value
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in by_name.items()}


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell) if cell not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def before_after_scores(series: dict[str, Series]) -> dict[str, dict[str, float]]:
    """``{metric: {"before": v, "after": v}}`` from the ``eval/<metric>_before`` / ``_after`` series (last value)."""
    scores: dict[str, dict[str, float]] = {}
    for name, (_, values) in series.items():
        match = BEFORE_AFTER.fullmatch(name)
        if match and values:
            scores.setdefault(match.group(1), {})[match.group(2)] = values[-1]
    return scores


def group_charts(series: dict[str, Series]) -> list[tuple[str, list[Chart]]]:
    """The charts of each non-empty section, in :data:`SECTIONS` order (see the module docstring)."""
    names = [n for n in series if not BEFORE_AFTER.fullmatch(n)]
    used: set[str] = set()
    sections: dict[str, list[Chart]] = {title: [] for title in SECTIONS}

    def line(name: str, label: str | None = None, role: str = "other") -> Line:
        used.add(name)
        steps, values = series[name]
        return Line(label or name, steps, values, role)  # type: ignore[arg-type]

    rewards = [n for n in names if n == "train/score" or n.startswith("train/score_")]
    if rewards:
        sections["Reward and KL"].append(Chart("reward", [line(n, n.removeprefix("train/")) for n in rewards]))
    for name, title in (("train/kl", "KL to the reference (per sequence)"), ("train/kl_coef", "KL coefficient")):
        if name in series:
            sections["Reward and KL"].append(Chart(title, [line(name, "train", "train")]))

    for name in (n for n in names if n.startswith("gold/")):
        key = name.removeprefix("gold/")
        proxy = next((p for p in (f"train/{key}", "train/score") if p in series), None)
        chart = Chart(f"gold against proxy: {key}", [line(proxy, f"proxy ({proxy})", "train")] if proxy else [])
        chart.right.append(line(name, f"gold ({name})", "gold"))
        sections["Gold against proxy"].append(chart)

    suffixes = [n.split("/", 1)[1] for n in names if n.startswith(("train/", "val/")) and n not in used]
    ordered = sorted(dict.fromkeys(suffixes), key=lambda s: (s != "loss", s != "perplexity"))
    for suffix in ordered:
        chart = Chart(suffix, [line(f"{p}/{suffix}", p, p) for p in ("train", "val") if f"{p}/{suffix}" in series])
        if suffix == "perplexity" and "train/perplexity" not in series and "train/loss" in series:
            steps, losses = series["train/loss"]
            chart.lines.insert(0, Line("train (exp of train/loss)", steps, [math.exp(min(v, 30.0)) for v in losses],
                                       "derived"))
        sections["Training and validation"].append(chart)
    if "lr" in series:
        sections["Training and validation"].append(Chart("learning rate", [line("lr", "lr", "train")]))

    for name in (n for n in names if n.startswith("eval/")):
        sections["Evaluation"].append(Chart(name.removeprefix("eval/"), [line(name, name, "val")]))

    for prefix, together, title, unit in (("throughput/", "tokens_per_s", "tokens/s", "tokens/s"),
                                          ("memory/", "_gib", "memory (GiB)", "GiB")):
        section = sections["Throughput" if prefix == "throughput/" else "Memory"]
        group = [n for n in names if n.startswith(prefix) and n.endswith(together)]
        if group:
            section.append(Chart(title, [line(n, n.removeprefix(prefix)) for n in group], ylabel=unit))
        for name in (n for n in names if n.startswith(prefix) and n not in used):
            section.append(Chart(name.removeprefix(prefix), [line(name, name.removeprefix(prefix))]))

    for name in (n for n in names if n not in used and not n.startswith("cost/")):
        sections["Other"].append(Chart(name, [line(name, name)]))
    return [(title, charts) for title, charts in sections.items() if charts]


def moving_mean(values: list[float], window: int) -> list[float]:
    """Centred moving mean over ``window`` points (fewer at the ends, where the window is cut)."""
    half = max(window, 1) // 2
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def draw(chart: Chart, width_in: float = 6.0, height_in: float = 3.3, dpi: int = 110) -> bytes:
    """The chart as PNG bytes (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw_lines(ax, chart.lines, 0)
    handles, labels = ax.get_legend_handles_labels()
    if chart.right:
        right = ax.twinx()
        _draw_lines(right, chart.right, len(chart.lines))
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
        right.spines["top"].set_visible(False)
        right.tick_params(labelsize=8, colors="#374151")
        right.set_ylabel("gold", fontsize=9, color=COLOURS["gold"])
        ax.set_ylabel("proxy", fontsize=9, color=COLOURS["train"])
    ax.set_title(chart.title, loc="left", fontsize=11, fontweight="bold", color="#111827")
    ax.set_xlabel("step", fontsize=9, color="#4b5563")
    if chart.ylabel:
        ax.set_ylabel(chart.ylabel, fontsize=9, color="#4b5563")
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(bool(chart.right) and side == "right")
    for spine in ax.spines.values():
        spine.set_color("#9ca3af")
    ax.tick_params(labelsize=8, colors="#374151")
    if len(labels) > 1:
        ax.legend(handles, labels, fontsize=8, frameon=False, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _draw_lines(ax, lines: list[Line], offset: int) -> None:
    values = [v for line in lines for v in line.values]
    for i, line in enumerate(lines):
        colour = COLOURS.get(line.role, PALETTE[(offset + i) % len(PALETTE)])
        if line.role == "derived":
            colour = COLOURS["train"]
        dash = "--" if line.role == "derived" else "-"
        n = len(line.values)
        if n == 1:
            ax.scatter(line.steps, line.values, s=36, color=colour, label=line.label, zorder=3)
        elif n >= SMOOTH_FROM and line.role != "val":
            ax.plot(line.steps, line.values, dash, color=colour, alpha=0.25, linewidth=1)
            ax.plot(line.steps, moving_mean(line.values, max(3, n // 25)), dash, color=colour, linewidth=2,
                    label=line.label)
        else:
            marker = "o" if n <= 30 or line.role == "val" else None
            ax.plot(line.steps, line.values, dash, color=colour, marker=marker, markersize=4, linewidth=1.8,
                    label=line.label)
    if values and min(values) >= 1 and max(values) / min(values) > 50:
        ax.set_yscale("log")
