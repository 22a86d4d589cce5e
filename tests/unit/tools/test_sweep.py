"""Sweeps: the sweep files pass W&B's schema, trials are exactly the commands W&B's agent would run (plain CLI
arguments that every DDP rank parses), grid order is W&B's, and the offline controller ranks trials by the metric."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_ft.data.sources import DataError
from lit_ft.tools.sweep import OfflineSweep, TrialMetrics, agent_command, fit_arguments, load_sweep, main
from tests.tiny_models import ROOT

SWEEP_FILES = sorted(p for p in (ROOT / "configs" / "sweeps").glob("*.yaml") if "method" in yaml.safe_load(p.read_text()))


def _agent_run(monkeypatch, tmp_path, sweep: dict, values: dict) -> list[str]:
    """The command W&B's own agent builds for ``values`` (``Agent._command_run``, its process start captured)."""
    import wandb.wandb_agent as agent_module

    started: list[list[str]] = []

    class Captured:
        def __init__(self, command=None, **kwargs):
            started.append(command)

    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_SWEEP_ID"):
        monkeypatch.setenv(name, str(tmp_path) if name == "WANDB_DIR" else "unset")  # restored after the test
    monkeypatch.setattr(agent_module, "AgentProcess", Captured)
    agent = agent_module.Agent(api=None, queue=None, sweep_id="s1")
    agent._sweep_command = list(sweep["command"])
    agent._command_run({"args": {k: {"value": v} for k, v in values.items()}, "program": sweep.get("program"),
                        "run_id": "r1"})
    return started[0]


def test_sweep_files_are_valid_wandb_sweep_configs() -> None:
    assert {p.name for p in SWEEP_FILES} >= {"sft.yaml", "sft_grid.yaml"}
    for path in SWEEP_FILES:
        sweep = load_sweep(path)
        assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
        assert all(key.startswith(("model.", "trainer.", "data.")) for key in sweep["parameters"])


def test_wandb_schema_rejects_a_broken_sweep_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "annealing", "parameters": {"model.neftune_alpha": {"values": []}},
                                   "command": ["${env}", "lit-ft", "fit", "${args}"]}))
    with pytest.raises(DataError, match="not a valid W&B sweep config: 'annealing' is not one of"):
        load_sweep(bad)


def test_expansion_is_exactly_what_the_wandb_agent_runs(monkeypatch, tmp_path) -> None:
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "sft.yaml")
    values = {"model.backbone.lora.alpha": 64, "model.backbone.lora.r": 8, "model.neftune_alpha": 5.0,
              "model.optimizer.init_args.lr": 0.0012, "model.scheduler.init_args.warmup_steps": 20}
    ours = agent_command(sweep, values)
    assert ours == _agent_run(monkeypatch, tmp_path, sweep, values)
    assert ours == [
        "/usr/bin/env", "lit-ft", "fit", "--config", "configs/sft.yaml", "--config", "configs/sweeps/sft_trial.yaml",
        "--model.backbone.lora.alpha=64", "--model.backbone.lora.r=8", "--model.neftune_alpha=5.0",
        "--model.optimizer.init_args.lr=0.0012", "--model.scheduler.init_args.warmup_steps=20",
    ]
    grid = load_sweep(ROOT / "configs" / "sweeps" / "sft_grid.yaml")
    values = {"model.backbone.lora.r": 16, "model.optimizer.init_args.lr": 0.004}
    assert agent_command(grid, values) == _agent_run(monkeypatch, tmp_path, grid, values)
    assert agent_command(grid, values)[:4] == ["/usr/bin/env", "python", "-m", "lit_ft"]


def test_other_agent_macros_expand_like_the_agent(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LIT_FT_TEST_CONFIG", "configs/sft.yaml")
    sweep = {"program": "lit-ft", "command": ["${program}", "fit", "--config", "${envvar:LIT_FT_TEST_CONFIG}",
                                              "${args_no_hyphens}", "${args_no_boolean_flags}"]}
    values = {"trainer.fast_dev_run": False, "model.neftune_alpha": 5}
    ours = agent_command(sweep, values)
    assert ours == _agent_run(monkeypatch, tmp_path, sweep, values)
    assert ours == ["lit-ft", "fit", "--config", "configs/sft.yaml", "trainer.fast_dev_run=False",
                    "model.neftune_alpha=5", "--model.neftune_alpha=5"]


def test_grid_dry_run_lists_trials_in_wandb_grid_order_then_stops(capsys) -> None:
    main([str(ROOT / "configs" / "sweeps" / "sft_grid.yaml"), "--dry-run", "--trials", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    picked = [(line.split("lora.r=")[1].split()[0], line.split("lr=")[1].split()[0]) for line in lines]
    assert picked == [("8", "0.001"), ("8", "0.002"), ("8", "0.004"), ("16", "0.001"), ("16", "0.002"), ("16", "0.004")]


def test_sampled_values_reach_lightning_cli_from_the_command_line_alone(monkeypatch, capsys) -> None:
    """Every DDP rank runs the same command line, so every rank parses the sampled values (wandb issue #3883:
    values that only rank 0 reads from wandb.config). The trial config is also checked: no checkpoint over runs/sft,
    no adapter over artifacts/sft, the metrics callback in."""
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "sft.yaml")
    values = {"model.backbone.lora.alpha": 16, "model.backbone.lora.r": 32, "model.neftune_alpha": 5.0,
              "model.optimizer.init_args.lr": 0.00123, "model.scheduler.init_args.warmup_steps": 5}
    command = agent_command(sweep, values)
    assert not any("wandb" in token for token in command)
    from lit_ft.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(fit_arguments(command) + ["--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    init = config["model"]["init_args"]
    assert init["optimizer"]["init_args"]["lr"] == 0.00123 and init["neftune_alpha"] == 5.0
    assert (init["backbone"]["lora"]["r"], init["backbone"]["lora"]["alpha"]) == (32, 16)
    assert init["scheduler"]["init_args"]["warmup_steps"] == 5 and init["export_dir"] is None
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert callbacks == ["lit_ft.callbacks.evaluation.GenerationTable", "lit_ft.tools.sweep.TrialMetrics"]


def test_overrides_may_not_fix_a_swept_key() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(ROOT / "configs" / "sweeps" / "sft.yaml"), "--dry-run", "--model.optimizer.init_args.lr=0.1"])
    assert exit_info.value.code == 2


FAKE_TRIAL = """
import json, os, sys
values = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--"))
lr = float(values["model.optimizer.init_args.lr"])
if lr > 0.5:
    sys.exit(3)  # a failing trial
report = {"metrics": {"val/loss": (lr - 0.02) ** 2 + float(values.get("extra", 0))}, "wandb_dir": None}
open(os.environ["LIT_FT_TRIAL_METRICS"], "w").write(json.dumps(report))
"""


def _fake_sweep(tmp_path: Path, method: str, parameters: dict) -> dict:
    script = tmp_path / "trial.py"
    script.write_text(FAKE_TRIAL)
    return {"method": method, "metric": {"name": "val/loss", "goal": "minimize"}, "parameters": parameters,
            "program": str(script), "command": ["${env}", "${interpreter}", "${program}", "${args}"]}


def test_offline_grid_sweep_runs_each_trial_and_ranks_by_the_metric(tmp_path, capsys) -> None:
    sweep = _fake_sweep(tmp_path, "grid", {"model.optimizer.init_args.lr": {"values": [0.1, 0.9, 0.01, 0.03]}})
    controller = OfflineSweep(sweep, tmp_path / "out", overrides=["--extra=1"])
    trials = controller.run(4)
    assert [t.values["model.optimizer.init_args.lr"] for t in trials] == [0.1, 0.9, 0.01, 0.03]
    assert [t.returncode for t in trials] == [0, 3, 0, 0]
    assert trials[0].command[-1] == "--extra=1" and trials[0].command[1] == "python"
    ranked = controller.ranked()
    assert [t.values["model.optimizer.init_args.lr"] for t in ranked] == [0.01, 0.03, 0.1, 0.9]  # failed last
    assert ranked[0].metrics["val/loss"] == pytest.approx(1 + 0.01 ** 2)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [t["index"] for t in summary["ranking"]] == [3, 4, 1, 2]


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_offline_random_and_bayes_sample_within_bounds_and_repeat_with_the_seed(tmp_path, method) -> None:
    parameters = {"model.optimizer.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1}}
    sweep = _fake_sweep(tmp_path, method, parameters)
    picked = []
    for seed in (5, 5):
        trials = OfflineSweep(sweep, tmp_path / f"out{len(picked)}", seed=seed).run(3)
        picked.append([t.values["model.optimizer.init_args.lr"] for t in trials])
        assert all(1e-3 <= v <= 1e-1 for v in picked[-1]) and len(set(picked[-1])) == 3
        assert all(isinstance(v, float) for v in picked[-1])  # plain floats, as W&B's server sends them
    assert picked[0] == picked[1]


def test_trial_metrics_callback_writes_final_metrics(tmp_path, monkeypatch) -> None:
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (self.w * batch).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", (self.w * batch).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = tmp_path / "metrics.json"
    monkeypatch.setenv("LIT_FT_TRIAL_METRICS", str(path))
    data = torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TrialMetrics()], accelerator="cpu")
    module = Tiny()
    trainer.fit(module, data, data)
    report = json.loads(path.read_text())
    assert report["global_step"] == 2
    assert report["metrics"]["val/loss"] == pytest.approx(float(module.w.detach()) ** 2)


@pytest.mark.slow
def test_offline_sweep_of_real_lit_ft_trials(tmp_path, monkeypatch, capsys) -> None:
    """Two real `lit-ft fit` trials on a tiny base (W&B offline runs), ranked at the end."""
    from lit_ft.backbone import Backbone, build_model, load_tokenizer, save_full_model
    from tests.tiny_models import TINY

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    base = save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp_path / "base", tokenizer)
    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "sft.yaml").read_text())
    sweep["command"] = [c.replace("configs/", f"{ROOT}/configs/") for c in sweep["command"]]
    sweep["parameters"] = {"model.optimizer.init_args.lr": {"values": [1e-3, 1e-2]}}
    sweep["method"] = "grid"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(tmp_path)
    trials = main([str(path), "--offline", "--trials", "2", f"--model.backbone.pretrained={base}",
                   "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--data.source.num_train=64",
                   "--data.source.num_heldout=8"])
    out = capsys.readouterr().out
    assert [t.returncode for t in trials] == [0, 0], out
    assert all("val/loss" in t.metrics and t.wandb_dir and Path(t.wandb_dir).name.startswith("offline-run-")
               for t in trials)
    assert trials[0].metrics["val/loss"] <= trials[1].metrics["val/loss"]
    assert "sweep ranking by val/loss" in out and sys.executable
