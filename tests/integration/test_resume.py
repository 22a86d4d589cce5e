"""Resume after a real SIGKILL: a `lit-ft fit` subprocess is killed between checkpoints, resumed with
`--ckpt_path last`, killed again in the middle of a checkpoint write, resumed again, and must end with the same
trainable weights as an uninterrupted run (max abs diff <= 1e-6 on CPU), having trained on exactly the same
batches, in one W&B run. SFT and PPO run as subprocesses; the reward model resumes in process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks.checkpointing import TMP_PREFIX, ModelCheckpoint
from lit_ft.data.preference import PreferenceDataModule
from lit_ft.stages.reward_model import RewardModel
from tests.tiny_models import StopAt
from tests.tiny_runs import (
    adapter_weights,
    max_abs_diff,
    ppo_config,
    read_batches,
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


# ------------------------------------------------------------------------------------------- reward model
def _pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"What is {i} + 2?", "chosen": str(i + 2), "rejected": str(i + 3)} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _fit_rm(run_dir: Path, base: str, data: Path, stop_at: int | None = None,
            ckpt_path: str | None = None) -> RewardModel:
    L.seed_everything(11)
    module = RewardModel(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                                                                     adapter_name="reward")),
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
