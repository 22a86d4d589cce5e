"""Resume after a real SIGKILL: a `lit-ft fit` subprocess is killed between checkpoints, resumed with
`--ckpt_path last`, killed again in the middle of a checkpoint write, resumed again, and must end with the same
trainable weights as an uninterrupted run (max abs diff <= 1e-6 on CPU), having trained on exactly the same
batches, in one W&B run. SFT, PPO and DPO (with its precomputed reference log-probs) run as subprocesses; the reward
model resumes in process.

The contract between a checkpoint and a resumed config (lit_ft.stages.run_contract): a longer run follows the new
schedule (finished and extended, or killed and resumed with a larger max_steps); a checkpoint file of another run
forks without writing into that run and keeps the config's settings; a renamed adapter is refused, never loaded
partially."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks.checkpointing import TMP_PREFIX, ModelCheckpoint
from lit_ft.data.preference import PreferenceDataModule
from lit_ft.errors import CheckpointError
from lit_ft.stages.reward_model import RewardModel
from lit_ft.stages.run_contract import RECORD_KEY
from lit_ft.stages.schedules import WarmupCosine
from tests.tiny_models import StopAt
from tests.tiny_runs import (
    adapter_weights,
    max_abs_diff,
    ppo_config,
    read_batches,
    read_lrs,
    run_fit,
    save_tiny_base,
    sft_config,
    write_alpaca,
    write_config,
)

TOLERANCE = 1e-6  # the bound for CPU


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("resume_base") / "tiny", tokenizer)


def _record(run_dir: Path) -> dict:
    return {"class_path": "tests.tiny_runs.RecordBatches", "init_args": {"path": str(run_dir / "batches.txt")}}


def _kill_at(step: int) -> dict:
    return {"class_path": "tests.tiny_runs.KillAt", "init_args": {"step": step}}


def _kill_in_write(step: int) -> list[dict]:
    return [{"class_path": "tests.tiny_runs.KillingCheckpointIO", "init_args": {"step": step}}]


def _step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


def _run(tmp_path: Path, name: str, config: dict, *args: str, killed: bool = False) -> None:
    result = run_fit(write_config(tmp_path / f"{name}.yaml", config), tmp_path, *args)
    want = -signal.SIGKILL if killed else 0
    assert result.returncode == want, f"{name}: exit {result.returncode}\n{result.stderr[-4000:]}"


def _wandb_run_ids(run_dir: Path) -> list[str]:
    return [p.name.rsplit("-", 1)[-1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _kill_twice_and_resume(tmp_path: Path, make_config, kill_between: int, last_before: int, kill_writing: int,
                           last_written: int) -> tuple[Path, Path]:
    """Reference run; then kill at ``kill_between``, resume, kill while writing ``kill_writing``, resume to the
    end. Checks the checkpoint left after each kill and returns (reference dir, resumed dir)."""
    ref, chain = tmp_path / "ref", tmp_path / "chain"
    _run(tmp_path, "ref", make_config(ref, callbacks=[_record(ref)]))
    _run(tmp_path, "killed", make_config(chain, callbacks=[_record(chain), _kill_at(kill_between)]), killed=True)
    last = chain / "checkpoints" / "last.ckpt"
    assert _step_of(last) == last_before
    _run(tmp_path, "killed-writing", make_config(chain, callbacks=[_record(chain)], plugins=_kill_in_write(kill_writing)),
         "--ckpt_path", "last", killed=True)
    assert list((chain / "checkpoints").glob(f"{TMP_PREFIX}*")), "the killed write should have left its temporary file"
    assert _step_of(last) == last_written  # the previous `last` is intact and loads
    _run(tmp_path, "resumed", make_config(chain, callbacks=[_record(chain)]), "--ckpt_path", "last")
    assert not list((chain / "checkpoints").glob(f"{TMP_PREFIX}*")), "stale temporary files are removed on start"

    # Batches: every step trained on the same batch as in the reference run; resumes start at the checkpoint.
    reference, resumed = read_batches(ref / "batches.txt"), read_batches(chain / "batches.txt")
    starts = [step for i, (step, _) in enumerate(resumed) if i and step <= resumed[i - 1][0]]
    assert starts == [last_before, last_written]
    assert dict(resumed) == dict(reference) and len(dict(reference)) == len(reference)
    # One W&B run, continued by both resumes.
    ids = _wandb_run_ids(chain)
    assert len(ids) == 3 and len(set(ids)) == 1, ids
    assert _wandb_run_ids(ref) != ids[:1]
    return ref, chain


def test_sft_resumes_exactly_after_sigkill_between_and_during_checkpoints(base, tmp_path) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 48)  # 16 packed rows: 8 steps an epoch, so resume crosses one

    def config(run_dir: Path, **trainer) -> dict:
        return sft_config(base, data, run_dir, max_steps=10, every=2, **trainer)

    ref, chain = _kill_twice_and_resume(tmp_path, config, kill_between=5, last_before=4, kill_writing=8,
                                        last_written=6)
    diff = max_abs_diff(adapter_weights(ref / "adapter"), adapter_weights(chain / "adapter"))
    print(f"SFT: max abs diff of the LoRA weights, resumed twice vs uninterrupted: {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow  # four PPO subprocesses: ~11 min wall here on 2 loaded cores, ~46 s of CPU each
def test_ppo_resumes_exactly_after_sigkill_between_and_during_checkpoints(base, tmp_path) -> None:
    """PPO: prompt position, sampling RNG, adaptive KL coefficient, optimiser all come back from the checkpoint."""

    def config(run_dir: Path, **trainer) -> dict:
        return ppo_config(base, run_dir, max_steps=24, every=8, **trainer)

    ref, chain = _kill_twice_and_resume(tmp_path, config, kill_between=12, last_before=8, kill_writing=24,
                                        last_written=16)
    for part in ("policy", "value"):
        diff = max_abs_diff(adapter_weights(ref / "out" / part), adapter_weights(chain / "out" / part))
        print(f"PPO {part}: max abs diff, resumed twice vs uninterrupted: {diff:.3g}")
        assert diff <= TOLERANCE, (part, diff)
    from safetensors.torch import load_file

    head = "out/value/value_head.safetensors"
    assert max_abs_diff(load_file(str(ref / head)), load_file(str(chain / head))) <= TOLERANCE
    kl = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["ppo"]["kl_controller"]
          for run in (ref, chain)]
    assert kl[0] == kl[1] and kl[0] != {"beta": 0.1}, kl
    # The "before" evaluation is the start's, restored from the checkpoint, not the resumed policy's.
    evaluations = [json.loads((run / "evaluation.json").read_text()) for run in (ref, chain)]
    assert evaluations[0]["scores"]["before"] == evaluations[1]["scores"]["before"]
    assert [r["before"] for r in evaluations[0]["rows"]] == [r["before"] for r in evaluations[1]["rows"]]


def _grpo_config(base: str, run_dir: Path, max_steps: int, every: int, **trainer) -> dict:
    """GRPO from a fresh policy adapter (ppo_config's run with the GRPO module): 8 prompts x G 4 per rollout batch,
    2 iterations x 2 minibatches = 4 updates a batch, the k3 KL to the base, exact-match reward."""
    config = ppo_config(base, run_dir, max_steps=max_steps, every=every, **trainer)
    config["model"] = {"class_path": "lit_ft.stages.grpo.GRPO", "init_args": {
        "backbone": config["model"]["init_args"]["backbone"], "policy_adapter": None, "reference": "base",
        "rewards": [{"class_path": "lit_ft.rl.rewards.ExactMatchReward"},
                    {"class_path": "lit_ft.rl.rewards.LengthPenalty", "init_args": {"per_token": 0.1}}],
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 4},
        "grpo": {"num_generations": 4, "num_iterations": 2, "minibatch_size": 16}, "kl": {"beta": 0.05},
        "evaluation": {"num_prompts": 2, "batch_size": 2}, "export_dir": str(run_dir / "out")}}
    return config


@pytest.mark.slow  # four GRPO subprocesses, as PPO's
def test_grpo_resumes_exactly_after_sigkill_between_and_during_checkpoints(base, tmp_path) -> None:
    """GRPO: prompt position, the sampling generator (samples and minibatch order), optimiser come back."""

    def config(run_dir: Path, **trainer) -> dict:
        return _grpo_config(base, run_dir, max_steps=24, every=8, **trainer)

    ref, chain = _kill_twice_and_resume(tmp_path, config, kill_between=12, last_before=8, kill_writing=24,
                                        last_written=16)
    diff = max_abs_diff(adapter_weights(ref / "out" / "policy"), adapter_weights(chain / "out" / "policy"))
    print(f"GRPO policy: max abs diff, resumed twice vs uninterrupted: {diff:.3g}")
    assert diff <= TOLERANCE


# ------------------------------------------------------------------------------------------- reward model
def _pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"What is {i} + 2?", "chosen": str(i + 2), "rejected": str(i + 3)} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _fit_rm(run_dir: Path, base: str, data: Path, stop_at: int | None = None,
            ckpt_path: str | None = None, adapter: str = "reward") -> RewardModel:
    L.seed_everything(11)
    module = RewardModel(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                                                                     adapter_name=adapter)),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    datamodule = PreferenceDataModule(source=str(data), val_split_fraction=0.0, max_seq_length=64, micro_batch_size=4)
    callbacks = [ModelCheckpoint(dirpath=run_dir, save_last=True, every_n_train_steps=2, save_top_k=0)]
    trainer = L.Trainer(max_steps=8, logger=False, callbacks=callbacks + ([StopAt(stop_at)] if stop_at else []),
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


def test_reward_model_resumes_exactly(base, tmp_path) -> None:
    data = _pairs(tmp_path / "pairs.jsonl", 20)  # 5 batches an epoch: the resume at step 4 crosses into epoch 1
    full = _fit_rm(tmp_path / "a", base, data)
    _fit_rm(tmp_path / "b", base, data, stop_at=5)
    assert _step_of(tmp_path / "b" / "last.ckpt") == 4
    resumed = _fit_rm(tmp_path / "b", base, data, ckpt_path="last")
    want = {n: p for n, p in full.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    assert any(n.startswith("score_head.") for n in want) and any("lora_" in n for n in want)
    assert max(float((got[n] - p).abs().max()) for n, p in want.items()) <= TOLERANCE


def test_reward_model_resume_with_a_renamed_adapter_is_refused_before_loading(base, tmp_path) -> None:
    """With strict_loading off, a renamed adapter used to match none of the checkpoint's tensors and train on from
    fresh LoRA weights with the old step count and optimiser. Now it is refused by the run record, and by the
    tensor check alone for a checkpoint written before the record existed."""
    data = _pairs(tmp_path / "pairs.jsonl", 8)
    _fit_rm(tmp_path / "run", base, data, stop_at=3)
    last = tmp_path / "run" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"adapters is \['reward'\] in the checkpoint, \['judge'\] in the config"):
        _fit_rm(tmp_path / "run", base, data, ckpt_path="last", adapter="judge")
    legacy = torch.load(last, weights_only=False)
    del legacy[RECORD_KEY]
    torch.save(legacy, tmp_path / "legacy.ckpt")
    with pytest.raises(CheckpointError, match=r"tensors are not in it .*nothing was loaded"):
        _fit_rm(tmp_path / "other", base, data, ckpt_path=str(tmp_path / "legacy.ckpt"), adapter="judge")


# ------------------------------------------------------------------------------------------------------ DPO
def _dpo_config(base: str, data: Path, run_dir: Path, **trainer) -> dict:
    """DPO of a fresh policy adapter against the base, reference log-probs precomputed: 5 batches an epoch."""
    from tests.tiny_runs import backbone_config, trainer_config

    return {
        "seed_everything": 42,
        "trainer": trainer_config(run_dir, 10, 2, **trainer),
        "model": {"class_path": "lit_ft.stages.dpo.DPO",
                  "init_args": {"backbone": backbone_config(base, None), "policy_adapter": None, "reference": "base",
                                "precompute_ref_log_probs": True,
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
                                "export_dir": str(run_dir / "adapter")}},
        "data": {"class_path": "lit_ft.data.preference.DPODataModule",
                 "init_args": {"source": str(data), "val_split_fraction": 0.0, "max_seq_length": 64,
                               "micro_batch_size": 4}},
    }


@pytest.mark.slow  # four DPO subprocesses: ~5 min wall on 2 loaded cores; .ci/run runs it
def test_dpo_resumes_exactly_with_its_reference_cache_after_sigkill(base, tmp_path) -> None:
    """DPO: the data position, the optimiser and the precomputed reference log-probs come back from the checkpoint
    (tests/unit/stages/test_dpo.py checks that it is read back, not recomputed), and the adapter ends as in an
    uninterrupted run."""
    data = _pairs(tmp_path / "pairs.jsonl", 20)  # 5 batches an epoch: the resumes cross into epoch 1

    def config(run_dir: Path, **trainer) -> dict:
        return _dpo_config(base, data, run_dir, **trainer)

    ref, chain = _kill_twice_and_resume(tmp_path, config, kill_between=5, last_before=4, kill_writing=8,
                                        last_written=6)
    diff = max_abs_diff(adapter_weights(ref / "adapter"), adapter_weights(chain / "adapter"))
    print(f"DPO: max abs diff of the LoRA weights, resumed twice vs uninterrupted: {diff:.3g}")
    assert diff <= TOLERANCE
    caches = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["dpo"]["ref_cache"]
              for run in (ref, chain)]
    assert caches[0].shape == (20, 2) and torch.equal(caches[0], caches[1])


# ------------------------------------------------------------------------------- the contract, through lit-ft
def _record_lr(run_dir: Path) -> dict:
    return {"class_path": "tests.tiny_runs.RecordLR", "init_args": {"path": str(run_dir / "lr.txt")}}


def _schedule(total: int, steps: int, lr: float = 1e-2) -> list[float]:
    """The learning rate of each step of a fresh ``total``-step WarmupCosine run (the config's defaults)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = WarmupCosine(optimizer)
    scheduler.set_total_steps(total)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_extending_a_finished_run_trains_on_with_the_new_schedule(base, tmp_path) -> None:
    """`--ckpt_path last --trainer.max_steps=8` after a run of 4: steps 5-8 used to run at lr 0.0."""
    data = write_alpaca(tmp_path / "train.jsonl", 48)
    run = tmp_path / "run"
    config = sft_config(base, data, run, max_steps=4, every=2, wandb=False, callbacks=[_record_lr(run)])
    _run(tmp_path, "four", config)
    first = adapter_weights(run / "adapter")
    result = run_fit(write_config(tmp_path / "four.yaml", config), tmp_path, "--ckpt_path", "last",
                     "--trainer.max_steps=8")
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_lrs(run / "lr.txt")
    assert [step for step, *_ in records] == list(range(8))
    want = _schedule(total=8, steps=8)
    print("extended run, LR by step:", [f"{lr:.2e}" for _, lr, _ in records])
    for step, lr, _ in records[4:]:
        assert lr > 0 and lr == pytest.approx(want[step], rel=1e-9), (step, lr, want[step])
    sums = [weights for *_, weights in records[4:]]
    assert len(set(sums)) == len(sums)  # every extended step starts from weights the previous one changed
    assert max_abs_diff(first, adapter_weights(run / "adapter")) > 1e-4
    assert _step_of(run / "checkpoints" / "last.ckpt") == 8
    assert "schedule horizon: checkpoint 4 steps, config 8 steps" in result.stdout


@pytest.mark.parametrize("stage", ["sft", pytest.param("ppo", marks=pytest.mark.slow)])  # ppo: 3 runs, ~2 min
def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(stage, base, tmp_path) -> None:
    """Killed after the checkpoint of its last step but before the export: the resume trains nothing (the step is
    already max_steps) and still does the end-of-training work, so the export appears, as the uninterrupted run's."""
    if stage == "sft":
        data = write_alpaca(tmp_path / "train.jsonl", 48)
        make = lambda run, **extra: sft_config(base, data, run, max_steps=4, every=2, wandb=False, **extra)
        steps, exported = 4, "adapter"
    else:
        make = lambda run, **extra: ppo_config(base, run, max_steps=8, every=4, wandb=False, **extra)
        steps, exported = 8, "out/policy"
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(tmp_path, "ref", make(ref))
    _run(tmp_path, "killed", make(run, callbacks=[{"class_path": "tests.tiny_runs.KillAtTrainEnd"}]), killed=True)
    assert _step_of(run / "checkpoints" / "last.ckpt") == steps and not (run / exported).exists()
    result = run_fit(write_config(tmp_path / "resumed.yaml", make(run, callbacks=[_record(run)])), tmp_path,
                     "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (run / "batches.txt").exists() or not read_batches(run / "batches.txt")  # no step trained again
    assert f"the checkpoint is already at trainer.max_steps={steps}" in result.stdout
    assert max_abs_diff(adapter_weights(ref / exported), adapter_weights(run / exported)) <= TOLERANCE


def test_killed_run_resumed_with_a_larger_max_steps_follows_the_new_schedule(base, tmp_path) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 48)
    run = tmp_path / "run"
    config = sft_config(base, data, run, max_steps=10, every=2, wandb=False, callbacks=[_record_lr(run)])
    killed = dict(config, trainer=dict(config["trainer"], callbacks=config["trainer"]["callbacks"] + [_kill_at(5)]))
    _run(tmp_path, "killed", killed, killed=True)
    assert _step_of(run / "checkpoints" / "last.ckpt") == 4
    _run(tmp_path, "resumed", config, "--ckpt_path", "last", "--trainer.max_steps=16")
    records = read_lrs(run / "lr.txt")
    resumed = records[5:]  # the killed run recorded steps 0-4; the resumed one restarts at the checkpoint, step 4
    assert [step for step, *_ in resumed] == list(range(4, 16))
    old, new = _schedule(total=10, steps=16), _schedule(total=16, steps=16)
    assert records[4][1] == pytest.approx(old[4], rel=1e-9) and old[4] != pytest.approx(new[4], rel=1e-3)
    for step, lr, _ in resumed:
        assert lr > 0 and lr == pytest.approx(new[step], rel=1e-9), (step, lr, new[step])
    sums = [weights for *_, weights in resumed]
    assert sums[0] == pytest.approx(records[4][2], rel=1e-6)  # the resume starts from the step-4 checkpoint
    assert len(set(sums)) == len(sums)  # and the weights keep changing up to step 16
    assert _step_of(run / "checkpoints" / "last.ckpt") == 16


@pytest.mark.parametrize("naming", ["other-run", "copied-elsewhere"])
def test_a_checkpoint_file_of_another_run_forks_and_the_config_wins(naming, base, tmp_path) -> None:
    """An explicit `--ckpt_path FILE` used to replace the config's model settings with the checkpoint's
    hyper-parameters (LightningCLI): the resumed run exported into the other run's adapter folder and ignored
    command-line overrides. Now the config wins, and the other run's files do not change."""
    data = write_alpaca(tmp_path / "train.jsonl", 48)
    a, b = tmp_path / "a", tmp_path / "b"
    _run(tmp_path, "a", sft_config(base, data, a, max_steps=4, every=2, wandb=False))
    checkpoint = a / "checkpoints" / "last.ckpt"
    if naming == "copied-elsewhere":
        (tmp_path / "elsewhere").mkdir()
        checkpoint = Path(shutil.copy(checkpoint, tmp_path / "elsewhere" / "model.ckpt"))
    before = _files(a)
    config = write_config(tmp_path / "b.yaml", sft_config(base, data, b, max_steps=6, every=2, wandb=False))
    result = run_fit(config, tmp_path, "--ckpt_path", str(checkpoint), "--model.init_args.loss_chunk_size=64",
                     "--model.init_args.optimizer.init_args.lr=0.02")
    assert result.returncode == 0, result.stderr[-4000:]
    assert _files(a) == before  # nothing of run a was written, moved or removed
    saved = torch.load(b / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    assert saved["hyper_parameters"]["export_dir"] == str(b / "adapter")
    assert saved["hyper_parameters"]["loss_chunk_size"] == 64
    assert saved["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.02  # the config's peak LR
    assert max_abs_diff(adapter_weights(a / "adapter"), adapter_weights(b / "adapter")) > 1e-4
    assert saved[RECORD_KEY]["settings.loss_chunk_size"] == 64
    assert "a checkpoint of another run" in result.stdout


def test_a_renamed_adapter_is_refused_and_the_run_is_left_as_it_was(base, tmp_path) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 48)
    run = tmp_path / "run"
    config = write_config(tmp_path / "sft.yaml", sft_config(base, data, run, max_steps=4, every=2, wandb=False))
    assert run_fit(config, tmp_path).returncode == 0
    before = _files(run)
    result = run_fit(config, tmp_path, "--ckpt_path", "last", "--trainer.max_steps=8",
                     "--model.init_args.backbone.lora.adapter_name=renamed")
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    want = (f"lit-ft: error: {run / 'checkpoints' / 'last.ckpt'}: cannot resume: adapters is ['sft'] in the "
            "checkpoint, ['renamed'] in the config; the checkpoint's weights are stored under its adapter names, so "
            "none would load")
    assert errors == [want], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _files(run) == before  # no step ran: the weights, checkpoint and export are the first run's
