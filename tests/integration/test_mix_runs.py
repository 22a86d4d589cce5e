"""Mixed data through `lit-ft fit`: a streamed mix resumes exactly after a SIGKILL (as the map-style SFT does in
test_resume.py), the embedded instructions mixed 0.7/0.3 with ../shared/data/alpaca_5000.json train and log that
mix, and a bad source stops the command with one line."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.integration.test_resume import TOLERANCE, _kill_twice_and_resume
from tests.tiny_runs import adapter_weights, max_abs_diff, run_fit, save_tiny_base, sft_config, write_config
from tests.unit.data.test_mixing import SHARE_TOLERANCE, shared_alpaca

MIX_LINE = re.compile(r"^  (\S+): weight ([\d.]+)%, .* in the mix ([\d,]+) examples \(([\d.]+)%\)", re.MULTILINE)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("mix_base") / "tiny", tokenizer)


def _with_sources(config: dict, sources: list[dict], **data) -> dict:
    init = {k: v for k, v in config["data"]["init_args"].items() if k != "source"}
    config["data"]["init_args"] = init | {"sources": sources} | data
    return config


def test_a_streamed_mix_resumes_exactly_after_sigkill(base, tmp_path) -> None:
    """Killed between checkpoints, then in the middle of a checkpoint write: same batches, same weights."""
    streamed = tmp_path / "stream.jsonl"
    streamed.write_text("".join(json.dumps({"instruction": f"Add {i} and {i % 7}.", "input": "",
                                            "output": str(i + i % 7)}) + "\n" for i in range(30)))
    loaded = tmp_path / "loaded.jsonl"
    loaded.write_text("".join(json.dumps({"prompt": f"{i} times 3 is", "completion": f" {3 * i}"}) + "\n"
                              for i in range(12)))
    sources = [{"source": str(streamed), "weight": 0.6, "streaming": True},
               {"source": str(loaded), "weight": 0.4}]

    def config(run_dir: Path, **trainer) -> dict:
        return _with_sources(sft_config(base, streamed, run_dir, max_steps=10, every=2, **trainer), sources)

    ref, chain = _kill_twice_and_resume(tmp_path, config, kill_between=5, last_before=4, kill_writing=8,
                                        last_written=6)
    diff = max_abs_diff(adapter_weights(ref / "adapter"), adapter_weights(chain / "adapter"))
    print(f"streamed mix: max abs diff of the LoRA weights, resumed twice vs uninterrupted: {diff:.3g}")
    assert diff <= TOLERANCE


def test_the_embedded_and_alpaca_5000_mix_trains_and_logs_its_weights(base, tmp_path) -> None:
    """Done-when 2 (the same sources and weights as configs/sft_mix.yaml, on the tiny base)."""
    alpaca = shared_alpaca()
    if alpaca is None:
        pytest.skip("../shared/data/alpaca_5000.json is absent beside this checkout")
    run = tmp_path / "run"
    sources = [{"source": {"class_path": "lit_ft.data.embedded.EmbeddedWorld"}, "weight": 0.7},
               {"source": str(alpaca), "weight": 0.3, "name": "alpaca_5000"}]
    config = _with_sources(sft_config(base, alpaca, run, max_steps=4, every=4, wandb=False), sources)
    base_digest = _digest(Path(base))
    result = run_fit(write_config(tmp_path / "mix.yaml", config), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    shares = {name: (float(weight), float(share)) for name, weight, _, share in MIX_LINE.findall(result.stdout)}
    print("logged mix:", shares)
    assert shares.keys() == {"EmbeddedWorld", "alpaca_5000"}
    for weight, share in shares.values():
        assert abs(share - weight) <= 100 * SHARE_TOLERANCE
    lora_b = [t for name, t in adapter_weights(run / "adapter").items() if "lora_B" in name]
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero: training moved it
    assert _digest(Path(base)) == base_digest  # the frozen base never changes


def test_a_bad_source_ends_lit_ft_with_one_line(base, tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    config = _with_sources(sft_config(base, data, tmp_path / "run", max_steps=1, wandb=False),
                           [{"source": str(data), "weight": 0.5}, {"source": str(data), "weight": -1.0}])
    result = run_fit(write_config(tmp_path / "bad.yaml", config), tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    want = ("lit-ft: error: data.sources[1] (d.jsonl): weight -1.0 is negative; weights are relative sampling "
            "rates >= 0")
    assert errors == [want], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            sha.update(path.read_bytes())
    return sha.hexdigest()
