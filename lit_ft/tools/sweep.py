"""``lit-ft sweep``: hyperparameter sweeps from W&B sweep files, run by W&B's agent or locally offline.

    lit-ft sweep sweeps/sft.yaml --offline --trials 3    # local: 3 trials, W&B offline runs, a ranking
    lit-ft sweep sweeps/sft.yaml --trials 10             # online: wandb sweep + wandb agent (needs W&B)
    lit-ft sweep sweeps/sft.yaml --dry_run --trials 4    # print the trial commands, run nothing

A sweep file is in W&B's own format (``method``, ``metric``, ``parameters``, ``program``, ``command``), so
``wandb sweep sweeps/sft.yaml`` then ``wandb agent <id>`` runs it too. It is checked with W&B's own sweep
engine (the ``sweeps`` package behind ``wandb[sweeps]``): its JSON-schema validation, its grid order, its random
and Bayesian search. Parameters are named by their LightningCLI keys (``model.optimizer.init_args.lr``).

Every trial runs the command W&B's agent would run: the file's ``command`` with the agent's macros (``${env}``,
``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}``...) expanded by the agent's own helpers, so
the sampled values are plain ``--key=value`` arguments of ``lit-ft fit``. Under DDP each rank parses the same
command line, so every rank gets them, not only rank 0 through ``wandb.config`` (wandb issue #3883).

Offline, this process is the sweep controller: each trial is a subprocess and its own W&B offline run (grouped
as ``sweep-<id>``). A trial reports its final metrics through :class:`TrialMetrics` (W&B keeps an offline run's
summary only in its binary log); then the trials are ranked by the sweep's metric.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from lit_ft.callbacks.evaluation import GenerationTable
from lit_ft.cli import ToolParser
from lit_ft.data.sources import DataError
from lit_ft.loggers.wandb_logger import wandb_credentials_available

METRICS_ENV = "LIT_FT_TRIAL_METRICS"  # where a trial writes its final metrics (set by the offline controller)
ARGS_MACROS = ("${args}", "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}")


def _sweeps():
    """W&B's sweep engine (``pip install 'wandb[sweeps]'``): schema checks and the grid/random/bayes searches."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it still declares pydantic-v1 config keys
            import sweeps
    except ImportError:
        raise DataError("W&B's sweep engine is missing: pip install 'wandb[sweeps]'") from None
    return sweeps


def load_sweep(path: str | os.PathLike) -> dict:
    """Read a sweep file and check it with W&B's sweep-config schema; problems are one-line DataErrors."""
    source = Path(path)
    if not source.is_file():
        raise DataError("sweep file not found", str(source))
    try:
        config = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"not valid YAML ({str(err).splitlines()[0]})", str(source)) from None
    if not isinstance(config, dict):
        raise DataError("a sweep file must be a YAML mapping", str(source))
    try:
        violations = _sweeps().schema_violations_from_proposed_config(config)
    except ValueError as err:
        violations = [str(err)]
    if violations:
        raise DataError("not a valid W&B sweep config: " + "; ".join(violations), str(source))
    if not config.get("command"):
        raise DataError("give the trial `command` (W&B's default runs `python <program>`, not lit-ft)", str(source),
                        "command")
    if config["method"] == "bayes" and "metric" not in config:
        raise DataError("bayes needs a metric to optimise", str(source), "metric")
    return config


def plain(value: Any) -> Any:
    """A sampled value as the JSON scalar W&B's server would send (numpy scalars become Python ones)."""
    return value.item() if hasattr(value, "item") else value


def agent_command(sweep: dict, values: dict[str, Any], args_json_file: str = "") -> list[str]:
    """The command W&B's agent runs for a trial with ``values``: the sweep's ``command``, macros expanded.

    Built on the agent's own helpers (``create_sweep_command`` for ``${envvar:NAME}``,
    ``create_sweep_command_args`` for the forms of ``${args}``); the substitution loop mirrors
    ``wandb.wandb_agent.Agent._command_run``, which is not importable on its own (tests compare the two).
    """
    from wandb.sdk.launch.sweeps import utils as agent_utils

    template = agent_utils.create_sweep_command(list(sweep.get("command") or []))
    sweep_vars = agent_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [sweep.get("program")]
    sweep_vars["args_json_file"] = [args_json_file]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    command: list[str] = []
    for chunk in map(str, template):
        if chunk.startswith("${") and chunk.endswith("}"):
            command += sweep_vars.get(chunk[2:-1]) or []
        else:
            command.append(chunk)
    return command


def fit_arguments(command: list[str]) -> list[str]:
    """What follows ``lit-ft`` (or ``python -m lit_ft``) in a trial command: the arguments of ``lit_ft.cli.main``."""
    for i, token in enumerate(command):
        if Path(token).name == "lit-ft":
            return command[i + 1:]
        if token == "-m" and command[i + 1:i + 2] in (["lit_ft"], ["lit_ft.cli"]):
            return command[i + 2:]
    raise DataError(f"the sweep command does not run lit-ft: {' '.join(command)}")


def trial_environment(offline: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trial: this Python's bin directory first on PATH, so that ``lit-ft`` and ``python``
    in the command are the ones running the sweep; offline W&B when asked."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if offline:
        env["WANDB_MODE"] = "offline"
    env.update(extra or {})
    return env


class TrialMetrics(L.Callback):
    """Writes a trial's final metrics as JSON for ``lit-ft sweep --offline`` (a W&B offline run keeps its
    summary only inside its binary ``.wandb`` log).

    Args:
        path: the JSON file; None reads ``$LIT_FT_TRIAL_METRICS`` and does nothing when that is unset (a trial
            run by W&B's agent online: the W&B run already holds the metrics).
    """

    def __init__(self, path: str | None = None):
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path or os.environ.get(METRICS_ENV)
        if not path or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        for callback in trainer.callbacks:
            if isinstance(callback, GenerationTable) and "exact_match" in callback.results.get("after", {}):
                metrics["eval/exact_match_after"] = callback.results["after"]["exact_match"]  # the key it logs
        wandb_dir = None
        for logger in trainer.loggers:
            experiment = getattr(logger, "_experiment", None)
            if experiment is not None and getattr(experiment, "dir", None):
                wandb_dir = str(Path(experiment.dir).parent)  # <save_dir>/wandb/offline-run-*/files -> run dir
        report = {"metrics": metrics, "global_step": trainer.global_step, "wandb_dir": wandb_dir}
        Path(path).write_text(json.dumps(report, indent=2))


@dataclass
class Trial:
    """One trial of an offline sweep: its sampled values, command, outcome and metrics."""

    index: int
    run_id: str
    values: dict[str, Any]
    command: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    wandb_dir: str | None = None
    log: str | None = None


class OfflineSweep:
    """This process as the sweep controller: W&B's search picks each trial's values from the finished ones.

    Args:
        sweep: the validated sweep config.
        out_dir: where trial logs, metrics and ``summary.json`` go.
        overrides: extra ``lit-ft fit`` arguments appended to every trial (not the swept keys).
        seed: seeds the search's random draws (``random`` and numpy), so a sweep can be repeated.
        stream: print each trial's output as it runs (otherwise it goes to ``trial-<n>.log`` only).
    """

    def __init__(self, sweep: dict, out_dir: Path, overrides: list[str] | None = None, seed: int = 0,
                 stream: bool = False):
        self.sweep = sweep
        self.out_dir = out_dir
        self.overrides = list(overrides or [])
        self.stream = stream
        self.sweep_id = secrets.token_hex(4)
        self.trials: list[Trial] = []
        self._runs: list[Any] = []  # sweeps.SweepRun records the search reads
        random.seed(seed)
        import numpy as np

        np.random.seed(seed)

    @property
    def metric(self) -> tuple[str | None, str]:
        metric = self.sweep.get("metric") or {}
        return metric.get("name"), metric.get("goal", "minimize")

    def suggest(self) -> dict[str, Any] | None:
        """The next trial's values from W&B's search, or None when a grid is exhausted."""
        run = _sweeps().next_run(self.sweep, self._runs)
        if run is None:
            return None
        run.name = f"{self.sweep_id}-{len(self._runs)}"
        self._runs.append(run)
        return {name: plain(spec["value"]) for name, spec in run.config.items()}

    def command(self, values: dict[str, Any], args_json_file: str = "") -> list[str]:
        """The agent's command for ``values``, then the overrides."""
        return agent_command(self.sweep, values, args_json_file) + self.overrides

    def run_trial(self, index: int, values: dict[str, Any]) -> Trial:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_id = f"{self.sweep_id}t{index}"
        args_json = self.out_dir / f"trial-{index}.args.json"
        args_json.write_text(json.dumps(values))
        trial = Trial(index, run_id, values, self.command(values, str(args_json)))
        metrics_file = self.out_dir / f"trial-{index}.metrics.json"
        log = self.out_dir / f"trial-{index}.log"
        env = trial_environment(offline=True, extra={
            "WANDB_RUN_ID": run_id, "WANDB_RUN_GROUP": f"sweep-{self.sweep_id}", METRICS_ENV: str(metrics_file),
            "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})  # the log follows the trial as it runs
        start = time.monotonic()
        with open(log, "w") as sink:
            proc = subprocess.Popen(trial.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                sink.write(line)
                if self.stream:
                    print(line, end="", flush=True)
            trial.returncode = proc.wait()
        trial.seconds = time.monotonic() - start
        trial.log = str(log)
        if metrics_file.exists():
            report = json.loads(metrics_file.read_text())
            trial.metrics, trial.wandb_dir = report["metrics"], report.get("wandb_dir")
        return trial

    def record(self, trial: Trial) -> None:
        """Tell the search how the trial ended (bayes reads the metric from finished runs)."""
        sweeps = _sweeps()
        run = self._runs[-1]
        name, _ = self.metric
        ok = trial.returncode == 0 and (name is None or name in trial.metrics)
        run.state = sweeps.RunState.finished if ok else sweeps.RunState.failed
        run.summary_metrics = dict(trial.metrics)
        self.trials.append(trial)

    def run(self, count: int) -> list[Trial]:
        for index in range(1, count + 1):
            values = self.suggest()
            if values is None:
                print(f"sweep: the grid is exhausted after {index - 1} trials")
                break
            shown = " ".join(f"{_short(k)}={v}" for k, v in values.items())
            print(f"sweep {self.sweep_id}: trial {index}/{count}: {shown}", flush=True)
            trial = self.run_trial(index, values)
            self.record(trial)
            name, _ = self.metric
            result = f"{name}={trial.metrics[name]:.4f}" if name in trial.metrics else "no metric"
            status = "done" if trial.returncode == 0 else f"FAILED (exit {trial.returncode}; log {trial.log})"
            print(f"sweep {self.sweep_id}: trial {index}/{count} {status} in {trial.seconds:.0f} s: {result}",
                  flush=True)
            if trial.returncode != 0:
                print("".join(Path(trial.log).read_text().splitlines(True)[-15:]), file=sys.stderr)
        self.write_summary()
        return self.trials

    def ranked(self) -> list[Trial]:
        """Trials best first by the sweep's metric; trials without it come last, in run order."""
        name, goal = self.metric
        scored = [t for t in self.trials if name in t.metrics]
        scored.sort(key=lambda t: t.metrics[name], reverse=goal == "maximize")
        return scored + [t for t in self.trials if t not in scored]

    def write_summary(self) -> Path:
        name, goal = self.metric
        summary = {"sweep_id": self.sweep_id, "metric": name, "goal": goal,
                   "ranking": [asdict(t) for t in self.ranked()]}
        path = self.out_dir / "summary.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        return path


def _short(key: str) -> str:
    """A column name for a LightningCLI key: its last two parts (``init_args`` dropped)."""
    parts = [p for p in key.split(".") if p != "init_args"]
    return ".".join(parts[-2:])


def ranking_table(trials: list[Trial], metric: str | None, goal: str, extra_metrics: tuple[str, ...] = ()):
    """A rich table of ``trials`` (already ranked): rank, trial, the metric, each swept value, time."""
    from rich.table import Table

    table = Table(title=f"sweep ranking by {metric} ({goal})")
    keys = list(dict.fromkeys(k for t in trials for k in t.values))
    shown_metrics = [m for m in (metric, *extra_metrics) if m and any(m in t.metrics for t in trials)]
    for column in ["rank", "trial", *shown_metrics, *map(_short, keys), "seconds", "status"]:
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for rank, t in enumerate(trials, start=1):
        cells = [str(rank), str(t.index)]
        cells += [f"{t.metrics[m]:.4f}" if m in t.metrics else "-" for m in shown_metrics]
        cells += [f"{t.values[k]:.3g}" if isinstance(t.values.get(k), float) else str(t.values.get(k, "-"))
                  for k in keys]
        cells += [f"{t.seconds:.0f}", "ok" if t.returncode == 0 else f"exit {t.returncode}"]
        table.add_row(*cells)
    return table


def print_ranking(controller: OfflineSweep) -> None:
    from rich.console import Console

    name, goal = controller.metric
    ranked = controller.ranked()
    console = Console(width=max(160, Console().width))  # a pipe or log file gets 80 columns: too few
    console.print(ranking_table(ranked, name, goal, extra_metrics=("eval/exact_match_after",)))
    best = next((t for t in ranked if name in t.metrics), None)
    if best is not None:
        print(f"best: trial {best.index}, {name}={best.metrics[name]:.4f}: {' '.join(best.command)}")
    print(f"summary: {controller.out_dir / 'summary.json'}")


def run_online(sweep: dict, trials: int) -> None:
    """``wandb sweep`` then ``wandb agent``: the W&B server picks the values, the agent runs the command."""
    import wandb

    os.environ["PATH"] = trial_environment(offline=False)["PATH"]  # the agent's children find lit-ft
    sweep_id = wandb.sweep(sweep, project=sweep.get("project"), entity=sweep.get("entity"))
    wandb.agent(sweep_id, project=sweep.get("project"), entity=sweep.get("entity"), count=trials)


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="lit-ft sweep",
        description="Run a W&B sweep file: online with W&B's agent, or offline as local trials ranked at the end. "
                    "Other --key=value arguments are passed to every trial's `lit-ft fit`.")
    parser.add_argument("sweep", help="a sweep file in W&B's format (e.g. sweeps/sft.yaml)")
    parser.add_argument("--trials", type=int, default=3, help="trials to run (grid: at most the grid's size)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="pick values here; each trial a W&B offline run")
    mode.add_argument("--online", action="store_true", help="wandb sweep + wandb agent (needs W&B credentials)")
    parser.add_argument("--dry_run", action="store_true", help="print the trial commands and run nothing")
    parser.add_argument("--print_config", action="store_true",
                      help="print the `lit-ft fit` config of the first trial (checks the swept keys) and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the offline random/bayes draws")
    parser.add_argument("--out", help="offline: folder for trial logs and summary.json "
                                      "(default runs/sweeps/<file>-<sweep id>)")
    parser.add_argument("--stream", action="store_true", help="offline: show each trial's output as it runs")
    return parser


def _check_overrides(overrides: list[str], sweep: dict, parser: argparse.ArgumentParser) -> None:
    swept = set(sweep.get("parameters", {}))
    for token in overrides:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if key in swept:
            parser.error(f"--{key} is swept by the sweep file; it cannot also be fixed for every trial")
    if overrides and not overrides[0].startswith("--"):
        parser.error(f"unrecognized argument: {overrides[0]}")


def main(argv: list[str] | None = None) -> list[Trial]:
    """Parse arguments and run the sweep; returns the offline trials, best first (empty for other modes)."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    sweep = load_sweep(args.sweep)
    _check_overrides(overrides, sweep, parser)
    controller = OfflineSweep(sweep, Path("."), overrides, seed=args.seed, stream=args.stream)
    if args.print_config:
        from lit_ft.cli import main as cli_main

        command = controller.command(controller.suggest() or {})
        print("trial 1: " + " ".join(command), file=sys.stderr)
        cli_main(fit_arguments(command) + ["--print_config"])
        return []
    if args.dry_run:
        for index in range(1, args.trials + 1):
            values = controller.suggest()
            if values is None:
                break
            print(" ".join(controller.command(values)))
        return []
    if args.online or (not args.offline and wandb_credentials_available()):
        if overrides:
            parser.error("online trials run the sweep file's command as it is; put the overrides in its command")
        run_online(sweep, args.trials)
        return []
    if not args.offline:
        print("sweep: no W&B credentials, running offline (pass --offline to say so, or log in for an online sweep)")
    controller.out_dir = Path(args.out or Path("runs") / "sweeps" / f"{Path(args.sweep).stem}-{controller.sweep_id}")
    name, goal = controller.metric
    print(f"sweep {controller.sweep_id}: {sweep['method']} search, {args.trials} trials, ranked by {name} ({goal}); "
          f"logs in {controller.out_dir}")
    controller.run(args.trials)
    print_ranking(controller)
    return controller.ranked()
