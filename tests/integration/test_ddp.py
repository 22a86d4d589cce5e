"""DDP on CPU (gloo): two processes with micro-batch b follow the loss curve of one process with micro-batch 2b,
the token-normalised loss is exact across ranks, and only rank 0 writes checkpoints and the W&B run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lit_ft.data.records import SeededShuffleSampler
from tests.tiny_runs import (
    adapter_weights,
    max_abs_diff,
    run_fit,
    save_tiny_base,
    sft_config,
    write_alpaca,
    write_config,
)

LOSS_TOLERANCE = 1e-4  # the bound: only the order of float sums differs between the two runs


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("ddp_base") / "tiny", tokenizer)


def _losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from the CSV logger's metrics.csv."""
    (metrics,) = run_dir.glob("csv/**/metrics.csv")
    with open(metrics) as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def _config(base: str, data: Path, run_dir: Path, micro_batch_size: int, **trainer) -> dict:
    config = sft_config(base, data, run_dir, max_steps=6, every=3, micro_batch_size=micro_batch_size,
                        gradient_clip_val=1.0, **trainer)
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir / "csv")}}
    config["trainer"]["logger"] = [csv_logger, config["trainer"]["logger"]]
    return config


@pytest.mark.slow  # a DDP run (2 processes) and a single run as subprocesses: ~2.7 min wall on 2 loaded cores
def test_two_ddp_processes_match_one_process_with_twice_the_micro_batch(base, tmp_path) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 48)  # 16 packed rows: 4 steps an epoch, the run crosses one
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_fit(write_config(tmp_path / "one.yaml", _config(base, data, one, micro_batch_size=4)), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = _config(base, data, two, micro_batch_size=2, strategy="ddp", devices=2,
                  plugins=[{"class_path": "tests.tiny_runs.RecordRanks"}])
    result = run_fit(write_config(tmp_path / "two.yaml", ddp), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    single, distributed = _losses(one), _losses(two)
    print(f"train/loss, 1 process x 4 rows: {single}\ntrain/loss, 2 processes x 2 rows: {distributed}")
    assert sorted(single) == sorted(distributed) and len(single) == 6, (single, distributed)
    assert max(abs(single[s] - distributed[s]) for s in single) <= LOSS_TOLERANCE, (single, distributed)
    assert len(set(single.values())) == 6  # the curve moves: this compares six different losses
    assert max_abs_diff(adapter_weights(one / "adapter"), adapter_weights(two / "adapter")) <= LOSS_TOLERANCE

    # Only rank 0 writes checkpoints and logs to W&B.
    assert [p.name for p in (two / "checkpoints").glob("saved-by-rank-*")] == ["saved-by-rank-0"]
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1


def _batches(sampler: SeededShuffleSampler, size: int) -> list[list[int]]:
    items = list(sampler)
    return [items[i:i + size] for i in range(0, len(items), size)]


def test_two_ranks_see_the_rows_of_one_rank_with_twice_the_batch_and_resume_exactly() -> None:
    one = _batches(SeededShuffleSampler(20, seed=5, batch_size=4), 4)
    ranks = [_batches(SeededShuffleSampler(20, seed=5, batch_size=2, num_replicas=2, rank=r), 2) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(batch) for batch in one]
    # Resume after 3 steps: the state names the rows consumed by both ranks, on any world size.
    state = {"epoch": 0, "consumed_batches": 3, "seed": 5, "items_per_batch": 4}
    for replicas in (1, 2):
        rest = []
        for rank in range(replicas):
            sampler = SeededShuffleSampler(20, seed=5, batch_size=4 // replicas, num_replicas=replicas, rank=rank)
            sampler.load_state_dict(state)
            assert sampler.consumed_batches == 3
            rest += list(sampler)
        assert sorted(rest) == sorted(i for batch in one[3:] for i in batch)
    # An odd count: every rank gets as many items (padded from the epoch's start), all items covered.
    odd = [list(SeededShuffleSampler(7, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 4 and set(odd[0] + odd[1]) == set(range(7))
