"""The run directory: where a run's local record lives, and the files in it.

RUN_DIR is the folder of the run's ``metrics.csv``: the first CSV logger's ``log_dir`` (lit_ft's
:class:`~lit_ft.loggers.csv_logger.CSVLogger`: its ``save_dir``, ``runs/<stage>`` in the stage configs). Without a
CSV logger it is the first logger's ``save_dir`` (W&B: ``runs/<stage>``); without any logger there is no run
directory and none of these files is written.

What a run leaves there, all written by rank zero, and all that ``lit-ft report RUN_DIR`` reads:

- ``metrics.csv``: every logged scalar by step (:class:`lit_ft.loggers.csv_logger.CSVLogger`);
- ``config.yaml``: the resolved config (:class:`lit_ft.cli.LogConfigCallback`);
- ``evaluation.json``: before/after generations and scores (:class:`lit_ft.callbacks.evaluation.GenerationTable`),
  see :func:`evaluation_record`;
- ``cost.json``: elapsed and projected device-hours and dollars (:class:`lit_ft.callbacks.cost.CostTracker`):
  ``devices``, ``prices`` ({instance: $/h}) and the ``cost/*`` metrics without their prefix
  (``elapsed_device_hours``, ``usd_<instance>``, ``projected_*``);
- ``report.html``: the page built from the files above (:class:`lit_ft.callbacks.report.RunReport`, ``lit-ft report``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
EVALUATION_FILE = "evaluation.json"
COST_FILE = "cost.json"
REPORT_FILE = "report.html"


def run_dir(trainer: Any) -> Path | None:
    """The trainer's run directory (see the module docstring for the rule), or None without loggers."""
    loggers = list(getattr(trainer, "loggers", None) or [])
    for logger in loggers:
        if isinstance(logger, _LightningCSVLogger):
            return Path(logger.log_dir)
    for logger in loggers:
        if getattr(logger, "save_dir", None):
            return Path(logger.save_dir)
    return None


def write_json(trainer: Any, name: str, data: dict[str, Any]) -> Path | None:
    """Write ``data`` to ``RUN_DIR/name`` on rank zero (temporary file, then rename: never half a file)."""
    directory = run_dir(trainer)
    if directory is None or not getattr(trainer, "is_global_zero", True):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


def evaluation_record(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``evaluation.json`` from before/after results ``{tag: {"rows": [(prompt, generation)], "exact_match",
    "per_task", "scored", "figures"}}``, where a prompt has ``.text`` and ``.reference``:

        {"tags": ["before", "after"],
         "scores": {tag: {"exact_match": float, "scored": int, "per_task": {task: float},
                          "figures": {"gold_win_rate": float, "reward_model_score": float, "kl_mean": float, ...,
                                      "exact_match/<task>": float, ...}}},
         "rows": [{"prompt": str, "reference": str, "before": str, "after": str}]}

    Rows are aligned across tags by position (the same held-out prompts each time); scores only where the answers
    are checkable.
    """
    tags = list(results)
    rows: list[dict[str, str]] = []
    for tag in tags:
        for i, (prompt, text) in enumerate(results[tag].get("rows", [])):
            if i == len(rows):
                rows.append({"prompt": getattr(prompt, "text", str(prompt)),
                             "reference": getattr(prompt, "reference", None) or ""})
            rows[i][tag] = text
    scores = {tag: {key: results[tag][key] for key in ("exact_match", "scored", "per_task", "figures")
                    if results[tag].get(key) not in (None, {})}
              for tag in tags}
    return {"tags": tags, "scores": {tag: s for tag, s in scores.items() if s}, "rows": rows}
