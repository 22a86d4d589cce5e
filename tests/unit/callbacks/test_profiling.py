"""Profiling callbacks: token/sample counts for every batch layout, the FLOP model's parameter counts, the GPU
table, and one short CPU fit with all four callbacks (metrics logged, trace and table written, cost projected)."""

from __future__ import annotations

import gzip
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lit_ft.callbacks.cost import CostTracker
from lit_ft.callbacks.memory import MemoryMonitor
from lit_ft.callbacks.profiler import ProfilerWindow
from lit_ft.callbacks.throughput import (
    ThroughputMonitor,
    batch_counts,
    current_device_peak,
    model_flop_counts,
)
from lit_ft.data.packing import PackedCollator, PaddedCollator


def _example(n: int, prompt: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(10, 10 + n)
    labels = ids.clone()
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(n)}


def _packed_row(*examples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([e[k] for e in examples]) for k in ("input_ids", "labels", "position_ids")}


def test_counts_of_packed_rows() -> None:
    rows = [_packed_row(_example(5, 2), _example(3, 1)), _packed_row(_example(6, 3))]  # lengths 8 and 6
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)  # (2, 8): the second row has 2 pads
    counts = batch_counts(batch, pad_id=0)
    assert int(counts["tokens"]) == 14
    assert int(counts["samples"]) == 3  # the pad segment also starts at position 0, but holds no real token
    # supervised: labels != -100 after the shift; the collator masks each example's first label
    assert int(counts["supervised"]) == int((batch["labels"][:, 1:] != -100).sum()) == (3 + 2 + 3)
    assert int(counts["context"]) == sum(range(1, 6)) + sum(range(1, 4)) + sum(range(1, 7))


def test_counts_of_padded_pairs_and_prompts() -> None:
    batch = PaddedCollator(pad_token_id=0, pad_to_multiple_of=8)([_example(5, 2), _example(3, 1)])
    counts = batch_counts(batch, pad_id=0)
    assert (int(counts["tokens"]), counts["samples"]) == (8, 2)
    assert int(counts["context"]) == sum(range(1, 6)) + sum(range(1, 4))
    pairs = {"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.tensor(
        [[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 3 + [0] * 3]), "margin": torch.zeros(2)}
    counts = batch_counts(pairs, pad_id=0)
    assert (int(counts["tokens"]), counts["samples"], counts["supervised"]) == (18, 2, 0)  # 2 pairs, no labels
    prompts = {"input_ids": torch.ones(3, 4, dtype=torch.long), "index": torch.arange(3),
               "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])}  # left-padded
    counts = batch_counts(prompts, pad_id=0)
    assert (int(counts["tokens"]), counts["samples"]) == (9, 3)
    assert int(counts["context"]) == 6 + 10 + 3


def test_model_flop_counts_of_a_lora_model(tokenizer) -> None:
    from lit_ft.backbone import build_model
    from tests.tiny_models import TINY, tiny_backbone

    model = build_model(tiny_backbone(), tokenizer)
    counts = model_flop_counts(model)
    h, inter, kv, r = TINY.hidden_size, TINY.intermediate_size, TINY.num_key_value_heads * 8, 4
    base = 2 * h * h + 2 * h * kv + 3 * h * inter
    lora = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))
    assert counts["body"] == TINY.num_hidden_layers * (base + lora)
    assert counts["trainable"] == TINY.num_hidden_layers * lora
    assert counts["head"] == len(tokenizer) * h and counts["head_trainable"] == 0.0


@pytest.mark.parametrize("name,precision,expected", [
    ("NVIDIA L40S", "bf16-mixed", 362e12),  # Lightning would read an L4 (121e12): MFU 3x too high
    ("NVIDIA L40", "bf16-mixed", 181e12),
    ("NVIDIA L4", "bf16-mixed", 121e12),  # Lightning's
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),  # Lightning's (H100 SXM)
    ("NVIDIA H100 PCIe", "bf16-mixed", 756e12),  # Lightning's
    ("NVIDIA H100 NVL", "bf16-mixed", 835e12),
    ("NVIDIA H200", "bf16-mixed", 989e12),  # Lightning knows no such name
    ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),  # Lightning's
    ("NVIDIA A10G", "bf16-mixed", 125e12),  # Lightning's
    ("NVIDIA A10", "bf16-mixed", 125e12),
    ("NVIDIA GeForce RTX 4090", "bf16-mixed", 165.2e12),
    ("Tesla T4", "bf16-mixed", None),  # no bf16 tensor cores
    ("Tesla T4", "16-mixed", 65e12),  # Lightning's fp16 rate
    ("Some Future GPU", "bf16-mixed", None),
])
def test_peak_flops_of_fake_devices(monkeypatch, name: str, precision: str, expected: float | None) -> None:
    """The MFU denominator for a device name: this project's table where Lightning lacks the device or gets it
    wrong, Lightning's get_available_flops elsewhere (it reads the name from torch.cuda, faked here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    peak, device = current_device_peak(precision)
    assert device == name and peak == (pytest.approx(expected) if expected else None)
    assert current_device_peak(precision, override=1e12) == (1e12, name)


class RecordingLogger(Logger):
    """Keeps what the callbacks log."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.tables: list[tuple[str, list[str], list[list]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_table(self, key: str, columns: list[str], data: list[list]) -> None:
        self.tables.append((key, columns, data))


class BatchTokens(L.Callback):
    """Counts real tokens of every training batch directly, to check the monitor's sums."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tokens += int((batch["input_ids"] != 0).sum())


def test_short_fit_logs_throughput_memory_cost_and_writes_a_trace(tmp_path, tokenizer, capsys) -> None:
    from lit_ft.data.instruction import InstructionDataModule
    from lit_ft.stages.causal_lm import CausalLM
    from tests.tiny_models import tiny_backbone

    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(48)]
    source = tmp_path / "data.json"
    source.write_text(json.dumps(records))
    torch.manual_seed(0)
    data = InstructionDataModule(source=str(source), format="alpaca", max_seq_length=64, micro_batch_size=2,
                                 val_split_fraction=0.0)
    data.connect(tokenizer)
    module = CausalLM(backbone=tiny_backbone())
    module._tokenizer = tokenizer
    logger, counter = RecordingLogger(), BatchTokens()
    throughput, memory, cost = ThroughputMonitor(skip_first_steps=0), MemoryMonitor(compare_after_batches=2), \
        CostTracker(warmup_steps=1, project_after_steps=2)
    profiler = ProfilerWindow(start_batch=2, num_batches=2, dirpath=str(tmp_path))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[throughput, memory, cost, profiler, counter])
    trainer.fit(module, data)
    out = capsys.readouterr().out

    logged = {k for _, m in logger.metrics for k in m}
    assert {"throughput/tokens_per_s", "throughput/supervised_tokens_per_s", "throughput/samples_per_s",
            "throughput/step_time_s", "throughput/data_wait_share", "throughput/tflops_per_s"} <= logged
    assert "throughput/mfu" not in logged  # CPU: no peak FLOP/s to divide by
    assert {"memory/rss_gib", "memory/estimate_allocated_gib", "cost/elapsed_device_hours",
            "cost/usd_g5.4xlarge", "cost/projected_device_hours"} <= logged
    assert sum(r["tokens"] for r in throughput.history) == counter.tokens  # every real token, counted once
    assert "memory after 2 batches" in out and "estimate" in out
    assert "cost, whole configured run: 6 steps" in out and "epochs of" in out
    assert "throughput:" in out and "on cpu" in out

    assert profiler.trace_path is not None and profiler.trace_path.exists()
    trace = json.loads(gzip.decompress(profiler.trace_path.read_bytes()))
    assert any("aten::mm" in str(e.get("name", "")) for e in trace["traceEvents"])
    assert "aten::" in profiler.table_path.read_text()
    key, columns, rows = logger.tables[0]
    assert key == "profiler/top_operators" and columns[0] == "operator" and rows
