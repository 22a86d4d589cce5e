"""The YAML configs compose: every file parses and opens with the command that runs it, no stage config repeats the
standard callbacks or loggers (they come from :mod:`lit_ft.cli`), each stage still gets every callback it had when
the configs listed them, and a 7B recipe resolves to the same run alone or over its stage config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_ft.cli import STANDARD_CALLBACKS, LitFtCLI, fill_run_dir, main
from tests.tiny_models import ROOT, config_command

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
YAML_FILES = sorted([*CONFIGS, *(ROOT / "sweeps").glob("*.yaml")])
RECIPES = {"mistral7b_qlora_alpaca": "sft", "mistral7b_qlora_rm_hh": "rm", "mistral7b_qlora_ppo": "ppo"}
PRICES = {"g5.4xlarge": 0.6942, "g5.8xlarge": 0.9331}  # the recipes' CostTracker prices

# What each stage config listed before the standard callbacks moved into the CLI (class, the settings it gave),
# its checkpoint callbacks first, then the rest, then its loggers.
def _before(run: str, every: int, best: bool = True, evaluation: dict | None = None, prices: dict | None = None,
            name: str | None = None) -> list[tuple[str, dict]]:
    checkpoints = f"runs/{run}/checkpoints"
    rows = [("checkpointing.ModelCheckpoint",
             {"dirpath": checkpoints, "save_last": True, "every_n_train_steps": every, "save_top_k": 0})]
    if best:
        rows.append(("checkpointing.ModelCheckpoint", {"dirpath": checkpoints, "monitor": "val/loss", "mode": "min",
                                                       "save_top_k": 2, "filename": "best-{step}"}))
    rows.append(("nan_guard.NonFiniteGuard", {"max_skipped_steps": 0}))
    if evaluation is not None:
        rows.append(("evaluation.GenerationTable", evaluation))
    rows += [("throughput.ThroughputMonitor", {}), ("memory.MemoryMonitor", {}), ("profiler.ProfilerWindow", {}),
             ("cost.CostTracker", {"prices": prices} if prices else {}), ("report.RunReport", {}),
             ("wandb_logger.WandbLogger", {"project": "lit_ft", "name": name, "save_dir": f"runs/{run}"}),
             ("csv_logger.CSVLogger", {"save_dir": f"runs/{run}"})]
    return rows


BEFORE = {
    "pretrain": _before("pretrain", 50, evaluation={"num_scored": 60}, name="pretrain-tiny"),
    "sft": _before("sft", 100, evaluation={"num_scored": 200, "max_new_tokens": 24}, name="sft-tiny"),
    "rm": _before("rm", 100, name="rm-tiny"),
    "ppo": _before("ppo", 40, best=False, name="ppo-tiny"),
    "mistral7b_qlora_alpaca": _before(
        "mistral7b_qlora_alpaca", 100, prices=PRICES, name="mistral7b-qlora-alpaca",
        evaluation={"num_shown": 6, "num_scored": 0, "max_new_tokens": 128, "batch_size": 6}),
    "mistral7b_qlora_rm_hh": _before("mistral7b_qlora_rm_hh", 250, prices=PRICES, name="mistral7b-qlora-rm-hh"),
    "mistral7b_qlora_ppo": _before("mistral7b_qlora_ppo", 160, best=False, prices=PRICES, name="mistral7b-qlora-ppo"),
}


class _ParseOnly(LitFtCLI):
    """The CLI up to the resolved config (run directory filled in), without building model, data or trainer."""

    def instantiate_classes(self) -> None:
        pass


def resolved(args: list[str]) -> dict:
    """The config ``lit-ft fit <args>`` runs with, as plain data."""
    return _ParseOnly(args=[a for a in args if a != "fit"], run=False).config.as_dict()


def callbacks_and_loggers(config: dict) -> list[tuple[str, dict]]:
    """(class, settings) of every callback and logger the run gets: trainer.callbacks, the standard groups that are
    on, and trainer.logger."""
    short = lambda path: path.removeprefix("lit_ft.callbacks.").removeprefix("lit_ft.loggers.")
    entries = list(config["trainer"].get("callbacks") or [])
    entries += [config[key] for key in STANDARD_CALLBACKS if config.get(key)]
    loggers = config["trainer"].get("logger")
    entries += loggers if isinstance(loggers, list) else [loggers] if loggers else []
    return [(short(e["class_path"]), e.get("init_args") or {}) for e in entries]


@pytest.mark.parametrize("path", YAML_FILES, ids=[p.name for p in YAML_FILES])
def test_every_yaml_parses_and_opens_with_the_command_that_runs_it(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    assert path.read_text().startswith("# lit-ft "), f"{path.name}: the first line gives the command that runs it"
    assert path.name in path.read_text().splitlines()[0]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_resolves_with_its_own_command(config: Path, capsys) -> None:
    args = config_command(config)
    assert args[0] == "fit" and str(config) in args
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lit_ft.") and printed["run"]["dir"].startswith("runs/")


def test_configs_holds_stage_configs_and_recipe_overlays_only() -> None:
    assert not [p for p in (ROOT / "configs").iterdir() if p.suffix != ".yaml"]
    assert {p.stem for p in CONFIGS} >= {"pretrain", "sft", "rm", "ppo", *RECIPES}
    for config in CONFIGS:  # a recipe overlay names its stage config first; a stage config runs alone
        args = config_command(config)
        assert args[:2] == ["fit", "--config"] and args[-1] == str(config)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_no_config_repeats_the_callback_list_or_the_loggers(config: Path) -> None:
    trainer = yaml.safe_load(config.read_text()).get("trainer") or {}
    assert "callbacks" not in trainer and "logger" not in trainer


@pytest.mark.parametrize("stage", sorted(BEFORE))
def test_each_stage_still_gets_every_callback_and_logger_it_had(stage: str) -> None:
    now = callbacks_and_loggers(resolved(config_command(ROOT / "configs" / f"{stage}.yaml")))
    assert sorted(name for name, _ in now) == sorted(name for name, _ in BEFORE[stage])
    for name, settings in BEFORE[stage]:
        assert any(n == name and all(s.get(k) == v for k, v in settings.items()) for n, s in now), (name, settings)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_resolves_the_same_alone_and_over_its_stage_config(recipe: str) -> None:
    path = ROOT / "configs" / f"{recipe}.yaml"
    composed = resolved(config_command(path))
    assert str(composed["config"][0]).endswith(f"configs/{RECIPES[recipe]}.yaml")  # composed over the stage
    alone = resolved(["--config", str(path)])
    for key in ["seed_everything", "trainer", "run", *STANDARD_CALLBACKS]:
        assert alone[key] == composed[key], key
    assert alone["seed_everything"] == 42 and alone["trainer"]["num_sanity_val_steps"] == 0


def test_run_dir_fills_in_what_the_config_leaves_unset() -> None:
    config = resolved(["--config", str(ROOT / "configs" / "sft.yaml"), "--run.dir=runs/elsewhere",
                       "--best_checkpoint.dirpath=/tmp/best"])
    assert config["checkpoint"]["init_args"]["dirpath"] == "runs/elsewhere/checkpoints"
    assert config["best_checkpoint"]["init_args"]["dirpath"] == "/tmp/best"  # set: kept
    assert [logger["init_args"]["save_dir"] for logger in config["trainer"]["logger"]] == ["runs/elsewhere"] * 2
    off = resolved(["--config", str(ROOT / "configs" / "sft.yaml"), "--trainer.logger=false", "--profiler=null"])
    assert off["trainer"]["logger"] is False and off["profiler"] is None


def test_fill_run_dir_keeps_a_logger_list_of_the_configs_own() -> None:
    from jsonargparse import Namespace

    own = [Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="x"))]
    settings = Namespace(run=Namespace(dir="runs/r", name=None), trainer=Namespace(logger=own))
    fill_run_dir(settings)
    assert settings.trainer.logger == own


def test_rl_settings_are_typed_groups_that_compose_setting_by_setting(capsys) -> None:
    """PPO's and GRPO's settings come in groups (sampling, ppo/grpo, kl, evaluation); a command-line override or an
    overlay changes one setting of a group and keeps the rest, and the help shows each setting's type."""
    ppo = resolved(config_command(ROOT / "configs" / "ppo.yaml") + ["--model.init_args.ppo.epochs=3"])["model"]
    groups = ppo["init_args"]
    assert {"sampling", "ppo", "kl", "evaluation"} <= set(groups)
    assert not {"temperature", "ppo_epochs", "kl_estimator", "kl_controller", "num_eval"} & set(groups)
    assert groups["ppo"]["epochs"] == 3 and groups["ppo"]["minibatch_size"] == 16  # the rest of ppo.yaml's group
    recipe = resolved(config_command(ROOT / "configs" / "mistral7b_qlora_ppo.yaml"))["model"]["init_args"]
    assert recipe["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128,
                                  "missing_eos_penalty": 1.0, "seed": None}
    assert recipe["ppo"]["epochs"] == 4 and recipe["ppo"]["value_clip_range"] == 0.2  # overlay + stage config
    assert recipe["kl"]["controller"]["class_path"] == "lit_ft.rl.kl.AdaptiveKLController"
    grpo = resolved(config_command(ROOT / "configs" / "mistral7b_qlora_grpo.yaml"))["model"]["init_args"]
    assert grpo["kl"] == {"beta": 0.04, "estimator": "k3"} and grpo["grpo"]["loss_type"] == "dapo"
    assert grpo["grpo"]["baseline"] == "group_mean" and grpo["evaluation"]["kl"] is True  # from grpo.yaml
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_ft.stages.ppo.PPO"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--model.kl.estimator {k1,k3}" in shown and "(type: Literal['k1', 'k3'], default: k1)" in shown
    assert "--model.sampling.temperature TEMPERATURE" in shown and "(type: float, default: 1.0)" in shown


@pytest.mark.parametrize("config, setting, wrong", [
    ("ppo.yaml", "kl.estimator", "k2"), ("ppo.yaml", "value_init", "warm"), ("grpo.yaml", "grpo.loss_type", "ppo"),
    ("grpo.yaml", "reference", "sft"),
])
def test_a_wrong_choice_is_one_line_and_exit_2(config: str, setting: str, wrong: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(config_command(ROOT / "configs" / config) + [f"--model.init_args.{setting}={wrong}", "--print_config"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"lit-ft: error: model.{setting}: Expected a typing.Literal[") and f"Got value: {wrong}" in err
