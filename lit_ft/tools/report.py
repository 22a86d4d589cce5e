"""``lit-ft report RUN_DIR``: one self-contained HTML page of a run, built from the files in its run directory.

    lit-ft report runs/sft                      writes runs/sft/report.html
    lit-ft report runs/ppo --out ppo.html

The page needs no server and nothing outside itself (images are inlined as base64 PNG): open it in a browser, or
send it. It reads only the run directory's files (:mod:`lit_ft.loggers.run_dir`): ``metrics.csv``, ``config.yaml``,
``evaluation.json`` and ``cost.json``, so it can be rebuilt after the run, on another machine, and for a run that
failed. Fit writes it at the end through :class:`lit_ft.callbacks.report.RunReport`.

Sections: a summary of headline numbers; the curves (:mod:`lit_ft.tools.report_charts` says how series are
grouped); the before/after scores and generations; the cost; the resolved config. A section whose file is missing
says which file and which callback writes it.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lit_ft.errors import UserError
from lit_ft.loggers.run_dir import CONFIG_FILE, COST_FILE, EVALUATION_FILE, METRICS_FILE, REPORT_FILE
from lit_ft.metrics import exact_match
from lit_ft.tools.report_charts import Series, before_after_scores, draw, group_charts, read_metrics


class RunDirError(UserError):
    """``lit-ft report`` was given a folder that is not a run directory."""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build the report of ``run_dir`` and write it to ``out`` (default ``RUN_DIR/report.html``); returns the path."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunDirError(f"{directory}: no such run directory")
    if not any((directory / name).is_file() for name in (METRICS_FILE, CONFIG_FILE, EVALUATION_FILE, COST_FILE)):
        raise RunDirError(f"{directory}: not a run directory (none of {METRICS_FILE}, {CONFIG_FILE}, "
                          f"{EVALUATION_FILE}, {COST_FILE})")
    path = Path(out) if out is not None else directory / REPORT_FILE
    page = build_report(directory)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def build_report(directory: Path) -> str:
    """The HTML page of the run in ``directory``."""
    series = read_metrics(directory / METRICS_FILE) if (directory / METRICS_FILE).is_file() else {}
    config_text = _read_text(directory / CONFIG_FILE)
    config = _yaml(config_text)
    evaluation = _read_json(directory / EVALUATION_FILE)
    cost = _read_json(directory / COST_FILE)
    title = f"{_stage(config)} · {directory.resolve().name}"
    body = [
        _header(title, directory, config),
        _summary(series, evaluation, cost),
        _curves(series),
        _before_after(series, evaluation),
        _cost(cost, series),
        _config(config_text),
        (f'<footer>Built {datetime.now():%Y-%m-%d %H:%M} from {html.escape(str(directory))} '
        f'({METRICS_FILE}, {CONFIG_FILE}, {EVALUATION_FILE}, {COST_FILE}). Rebuild with '
        f'<code>lit-ft report {html.escape(str(directory))}</code>.</footer>'),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")


# ------------------------------------------------------------------------------------------------ reading
def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # a file cut by a crash: the section says it is missing


def _yaml(text: str | None) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _get(tree: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _stage(config: dict[str, Any]) -> str:
    model = str(_get(config, "model", "class_path") or "run").rsplit(".", 1)[-1]
    if model == "CausalLM":
        return "pre-training" if _get(config, "model", "init_args", "backbone", "lora") is None else "SFT"
    return {"RewardModel": "reward model", "PPO": "PPO"}.get(model, model)


# ------------------------------------------------------------------------------------------------ sections
def _header(title: str, directory: Path, config: dict[str, Any]) -> str:
    facts = [("model", _get(config, "model", "class_path")),
             ("base", _get(config, "model", "init_args", "backbone", "pretrained")),
             ("data", _get(config, "data", "class_path")),
             ("source", _get(config, "data", "init_args", "source")),
             ("max steps", _get(config, "trainer", "max_steps")),
             ("seed", config.get("seed_everything"))]
    items = "".join(f"<span><b>{k}</b> {html.escape(str(v))}</span>" for k, v in facts if v not in (None, ""))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("curves", "Curves"), ("before-after", "Before / after"),
                                                          ("cost", "Cost"), ("config", "Config")))
    return (f"<header><h1>{html.escape(title)}</h1><div class=facts>{items}</div>"
            f"<nav>{nav}</nav><p class=dir>{html.escape(str(directory.resolve()))}</p></header>")


def _summary(series: dict[str, Series], evaluation: dict | None, cost: dict | None) -> str:
    cards: list[tuple[str, str, str]] = []
    steps = [s for st, _ in series.values() for s in st]
    if steps:
        cards.append(("steps", f"{max(steps):,.0f}", "last logged"))
    for name, label in (("train/loss", "train loss"), ("val/loss", "val loss"), ("val/perplexity", "val perplexity"),
                        ("val/accuracy", "val accuracy"), ("train/score", "reward"), ("train/kl", "KL")):
        if name in series:
            values = series[name][1]
            sub = f"best {_short(min(values))}" if name.startswith("val/") else f"first {_short(values[0])}"
            cards.append((label, _short(values[-1]), sub))
    scores = _scores(series, evaluation).get("exact_match", {})
    if "before" in scores and "after" in scores:
        cards.append(("exact match", f"{scores['before']:.0%} → {scores['after']:.0%}", "held-out, greedy"))
    for name, label, fmt in (("throughput/tokens_per_s", "tokens/s", "{:,.0f}"), ("throughput/mfu", "MFU", "{:.1%}")):
        if name in series:
            cards.append((label, fmt.format(statistics.median(series[name][1])), "median"))
    peaks = [max(series[n][1]) for n in ("memory/peak_allocated_gib", "memory/peak_rss_gib") if n in series]
    if peaks:
        cards.append(("peak memory", f"{peaks[0]:.2f} GiB", "allocated" if "memory/peak_allocated_gib" in series
                      else "process RSS"))
    if cost and "elapsed_device_hours" in cost:
        devices = max(1, int(cost.get("devices", 1)))
        cards.append(("time", _duration(cost["elapsed_device_hours"] * 3600 / devices), f"{devices} device(s)"))
        for name, price in list((cost.get("prices") or {}).items())[:1]:
            cards.append(("cost", f"${cost.get(f'usd_{name}', 0.0):.4f}", f"{name} at ${price}/h"))
    if not cards:
        return ""
    return "<section class=cards>" + "".join(
        f"<div class=card><div class=label>{html.escape(k)}</div><div class=value>{html.escape(v)}</div>"
        f"<div class=sub>{html.escape(s)}</div></div>" for k, v, s in cards) + "</section>"


def _curves(series: dict[str, Series]) -> str:
    parts = ['<section id="curves"><h2>Curves</h2>']
    groups = group_charts(series)
    if not groups:
        parts.append(_missing(METRICS_FILE, "the CSV logger (lit_ft.loggers.csv_logger.CSVLogger) writes it"))
    for title, charts in groups:
        parts.append(f"<h3>{html.escape(title)}</h3><div class=grid>")
        for chart in charts:
            png = base64.b64encode(draw(chart)).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(chart.title)}" src="data:image/png;base64,{png}">'
                         f"</figure>")
        parts.append("</div>")
    parts.append("<p class=note>Faint lines are every logged value, bold ones their moving mean; the x axis counts "
                 "optimizer steps.</p></section>")
    return "".join(parts)


def _scores(series: dict[str, Series], evaluation: dict | None) -> dict[str, dict[str, float]]:
    """Before/after scores by metric: evaluation.json's (exact match, per task), then eval/*_before|after."""
    scores: dict[str, dict[str, float]] = {}
    for tag, result in ((evaluation or {}).get("scores") or {}).items():
        if "exact_match" in result:
            scores.setdefault("exact_match", {})[tag] = result["exact_match"]
        for task, value in (result.get("per_task") or {}).items():
            scores.setdefault(f"exact_match/{task}", {})[tag] = value
        for metric, value in (result.get("figures") or {}).items():  # gold win-rate, reward model, KL, per family
            scores.setdefault(metric, {}).setdefault(tag, value)
    for metric, pair in before_after_scores(series).items():
        for tag, value in pair.items():
            scores.setdefault(metric, {}).setdefault(tag, value)
    return scores


def _before_after(series: dict[str, Series], evaluation: dict | None) -> str:
    parts = ['<section id="before-after"><h2>Before and after training</h2>']
    scores = _scores(series, evaluation)
    if scores:
        parts.append("<table class=scores><tr><th>held-out metric</th><th>before</th><th>after</th>"
                     "<th>change</th></tr>")
        for metric, pair in sorted(scores.items(), key=lambda kv: (kv[0] != "exact_match", kv[0])):
            before, after = pair.get("before"), pair.get("after")
            percent = metric.startswith(("exact_match", "accuracy", "gold_win_rate", "preferred_share"))
            change = "" if before is None or after is None else _signed(after - before, percent)
            parts.append(f"<tr><td>{html.escape(metric.replace('_', ' '))}</td><td>{_fmt(before, percent)}</td>"
                         f"<td>{_fmt(after, percent)}</td><td class=change>{change}</td></tr>")
        parts.append("</table>")
    rows = (evaluation or {}).get("rows") or []
    tags = (evaluation or {}).get("tags") or []
    if rows:
        parts.append("<h3>Generations (greedy, held-out prompts)</h3><table class=gen><tr><th>prompt</th>"
                     "<th>reference</th>" + "".join(f"<th>{html.escape(t)}</th>" for t in tags) + "</tr>")
        for row in rows:
            reference = row.get("reference") or ""
            cells = [(f'<td class=prompt title="{html.escape(row.get("prompt", ""))}">'
                     f"{html.escape(_instruction(row.get('prompt', '')))}</td>"),
                     f"<td class=ref>{html.escape(reference)}</td>"]
            for tag in tags:
                text = row.get(tag, "")
                mark = "" if not reference else (" ok" if exact_match(text, reference) else " bad")
                cells.append(f"<td class='out{mark}'>{html.escape(text)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    if not scores and not rows:
        parts.append(_missing(EVALUATION_FILE, "the GenerationTable callback writes it at the end of training"))
    parts.append("</section>")
    return "".join(parts)


def _instruction(prompt: str) -> str:
    """The instruction of an Alpaca-rendered prompt (what differs between rows), else the whole prompt."""
    head, marker, rest = prompt.partition("### Instruction:")
    text = rest if marker else head
    return text.split("### Response:", 1)[0].strip()


def _cost(cost: dict | None, series: dict[str, Series]) -> str:
    parts = ['<section id="cost"><h2>Cost</h2>']
    if cost is None:  # the last logged cost/* values, when the run ended before CostTracker wrote cost.json
        cost = {name.removeprefix("cost/"): values[-1] for name, (_, values) in series.items()
                if name.startswith("cost/")}
    if not cost:
        parts.append(_missing(COST_FILE, "the CostTracker callback writes it at the end of training"))
        return "".join(parts) + "</section>"
    prices = cost.get("prices") or {}
    names = list(prices) + [k.removeprefix("usd_") for k in cost
                            if k.startswith("usd_") and k.removeprefix("usd_") not in prices]
    devices = max(1, int(cost.get("devices", 1)))
    rows = []
    for prefix, hours_key in (("", "elapsed_device_hours"), ("projected_", "projected_device_hours")):
        if hours_key not in cost:
            continue
        hours = cost[hours_key]
        if prefix:
            rows.append(("whole configured run", (f"{cost.get('projected_total_steps', 0):,.0f} steps x "
                                                  f"{cost.get('projected_seconds_per_step', 0):.3f} s")))
            rows.append(("projected device-hours", f"{hours:.4f}"))
        else:
            rows += [("wall time", _duration(hours * 3600 / devices)), ("devices", str(devices)),
                     ("device-hours", f"{hours:.4f}")]
        for name in names:
            usd = cost.get(f"{prefix}usd_{name}", hours * prices.get(name, 0.0))
            rate = f" (${prices[name]}/h)" if name in prices else ""
            rows.append((f"{'projected on' if prefix else 'on'} {name}{rate}", f"${usd:.4f}"))
    if "projected_epochs" in cost:
        rows.append(("projected data", (f"{cost['projected_epochs']:.2f} epochs of "
                                        f"{cost.get('dataset_tokens', 0):,.0f} tokens")))
    parts.append("<table class=kv>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                                              for k, v in rows) + "</table></section>")
    return "".join(parts)


def _config(text: str | None) -> str:
    if text is None:
        body = _missing(CONFIG_FILE, "lit-ft fit writes it when training starts")
    else:
        body = f"<details open><summary>{CONFIG_FILE}</summary><pre>{html.escape(text)}</pre></details>"
    return f'<section id="config"><h2>Config</h2>{body}</section>'


# ------------------------------------------------------------------------------------------------ formatting
def _missing(name: str, why: str) -> str:
    return f"<p class=missing>Not recorded: no <code>{name}</code> in this run directory ({html.escape(why)}).</p>"


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if percent else f"{value:.3f}"


def _short(value: float) -> str:
    """A headline number: 3 decimals for small values, fewer as they grow (a perplexity of 31,640)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def _signed(delta: float, percent: bool) -> str:
    return f"{delta * 100:+.1f} pts" if percent else f"{delta:+.3f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:24px 28px 48px}
header h1{margin:0 0 6px;font-size:26px}.facts{display:flex;flex-wrap:wrap;gap:6px 18px;color:#374151}
.facts b{color:var(--muted);font-weight:500;margin-right:4px}.dir{color:var(--muted);font-size:12px;margin:6px 0 0}
nav{margin-top:10px;display:flex;gap:14px}nav a{color:var(--accent);text-decoration:none;font-weight:500}
h2{font-size:20px;margin:32px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 8px;color:#374151}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px;margin-top:20px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:600;margin:2px 0}.card .sub{color:var(--muted);font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:8px}
figure img{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:10px;
overflow:hidden;margin:6px 0 12px}
th,td{padding:7px 12px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;font-size:13px}
table.scores td:not(:first-child){font-variant-numeric:tabular-nums;text-align:right}
td.change{color:#374151;font-weight:600}
table.gen{width:100%;table-layout:fixed}table.gen td{white-space:pre-wrap;word-break:break-word;font-size:13px}
table.gen td.prompt{width:34%}td.ref{color:#374151;font-weight:600}
td.ok{background:#ecfdf5;color:#065f46}td.bad{background:#fef2f2;color:#991b1b}
table.kv th{width:260px}
pre{background:#0f172a;color:#e2e8f0;padding:14px 16px;border-radius:10px;overflow:auto;font-size:12px;
line-height:1.45;max-height:640px}
summary{cursor:pointer;color:var(--muted);margin-bottom:6px}
.missing{color:#92400e;background:#fffbeb;border:1px solid #fde68a;border-radius:8px;padding:8px 12px}
.note,footer{color:var(--muted);font-size:12px}footer{margin-top:36px}
code{background:#eef2f7;padding:1px 5px;border-radius:4px}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit-ft report",
                                     description="Write the run's self-contained HTML report from its run directory.")
    parser.add_argument("run_dir", help="the run directory (runs/<stage>): metrics.csv, config.yaml, *.json")
    parser.add_argument("--out", default=None, help=f"where to write the page (default RUN_DIR/{REPORT_FILE})")
    args = parser.parse_args(argv)
    print(f"report: {write_report(args.run_dir, args.out)}")
