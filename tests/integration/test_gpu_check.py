"""``make gpu-check``'s tiny variant: the same script as on the GPU (model saved in Hub format, the 7B recipes
through ``lit-ft`` with overrides, generate, the report), with tiny shapes on CPU, so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys

import torch

from tests.tiny_models import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_variant_runs_every_stage(tmp_path) -> None:
    from safetensors.torch import load_file

    results = _gpu_check().main(["--size", "tiny", "--in-process", "--out", str(tmp_path)])
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["build", "sft", "rm", "ppo", "generate", "sft_vs_trl"]
    assert all(r.ok for r in results), [(r.name, r.note) for r in results if not r.ok]
    for name in ("sft", "rm", "ppo"):  # the monitors' measured peak (CPU: RSS) beside the estimate
        stage = by_name[name]
        assert stage.peak_kind == "RSS" and stage.peak_gib > 0 and stage.estimate_gib > 0, stage
        assert stage.tokens_per_s > 0 and stage.mfu is None  # no peak FLOP/s on CPU
    assert by_name["generate"].peak_gib > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == list(by_name) and report["size"] == "tiny"
    assert "meas/est" in (tmp_path / "report.txt").read_text()
    # The chain really trained: the SFT adapter (PEFT starts lora_B at zero) moved, in the recipes' own folders;
    # the reward model and the PPO policy were exported next to it.
    adapter = load_file(tmp_path / "artifacts" / "mistral7b_qlora_alpaca" / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert (tmp_path / "artifacts" / "mistral7b_qlora_rm_hh" / "adapter_config.json").exists()
    assert (tmp_path / "artifacts" / "mistral7b_qlora_ppo" / "policy" / "adapter_config.json").exists()
    assert torch.get_num_threads() >= 1


def test_stage_lines_are_parsed() -> None:
    """The measurements come from the monitors' printed lines (CUDA form here, as on the GPU)."""
    check = _gpu_check()
    output = ("throughput: 4,321 tokens/s (1,234 supervised), 0.52 samples/s, 1893 ms/batch, data wait 0.1%, "
              "MFU 41.3% on NVIDIA H200\nmemory: run peak allocated 8.71 GiB, reserved 9.40 GiB; estimate 8.86 GiB "
              "allocated + 0.31 GiB paged optimiser state (measured/estimate 0.98)\n")
    result = check.parse("sft", True, output, 12.0, [])
    assert (result.peak_gib, result.estimate_gib, result.tokens_per_s) == (8.71, 8.86, 4321.0)
    assert abs(result.mfu - 0.413) < 1e-9 and result.peak_kind == "allocated"
    generate = check.parse("generate", True, 'text\ngpu-check peak: {"bytes": 5368709120, "kind": "allocated"}\n', 3.0, [])
    assert generate.peak_gib == 5.0 and generate.estimate_gib is None
