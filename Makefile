# lit_ft: `make install`, then `make sft` (embedded default, no GPU, no network), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LITFT := $(BIN)/lit-ft
BASE := artifacts/base/tiny-mistral
SFT_ADAPTER := artifacts/sft/adapter/adapter_config.json
RM_EXPORT := artifacts/rm/reward_stats.json
ARGS ?=

.PHONY: install pretrain sft rm ppo dpo pipeline test test-all bench bench-packing bench-memory gpu-check estimate sweep lint clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@# Without CUDA, pin the CPU wheel of torch (plain `torch` would pull a multi-GB CUDA build);
	@# with CUDA present, pip chooses the torch build.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: pip chooses the torch build"; \
	else \
		$(BIN)/pip install torch==2.13.0; \
	fi
	$(BIN)/pip install -e '.[dev]'

# The embedded base: a tiny Mistral-architecture model pre-trained from scratch on the project's own corpus.
$(BASE)/config.json:
	$(LITFT) fit --config configs/pretrain.yaml $(PRETRAIN_ARGS)

pretrain:
	$(LITFT) fit --config configs/pretrain.yaml $(ARGS)

sft: $(BASE)/config.json
	$(LITFT) fit --config configs/sft.yaml $(ARGS)

# Stage outputs that later stages start from: built once when absent (`make sft` / `make rm` retrain on demand).
$(SFT_ADAPTER): $(BASE)/config.json
	$(LITFT) fit --config configs/sft.yaml

$(RM_EXPORT): $(SFT_ADAPTER)
	$(LITFT) fit --config configs/rm.yaml

# The reward model starts from the SFT adapter (made first when absent). `lit-ft fit --config configs/rm.yaml`
# alone starts from the base model when there is no SFT adapter.
rm: $(SFT_ADAPTER)
	$(LITFT) fit --config configs/rm.yaml $(ARGS)

# PPO of the SFT policy against the reward model (both made first when absent).
ppo: $(SFT_ADAPTER) $(RM_EXPORT)
	$(LITFT) fit --config configs/ppo.yaml $(ARGS)

# DPO of the SFT policy on the preference pairs, no reward model (the SFT adapter is made first when absent).
dpo: $(SFT_ADAPTER)
	$(LITFT) fit --config configs/dpo.yaml $(ARGS)

# GRPO of the SFT policy with programmatic rewards (the SFT adapter made first when absent): no reward model.
grpo: $(SFT_ADAPTER)
	$(LITFT) fit --config configs/grpo.yaml $(ARGS)

# The whole post-training pipeline on the embedded default: pre-train (once), SFT, reward model, PPO.
pipeline:
	$(MAKE) sft
	$(MAKE) rm
	$(MAKE) ppo

TRIALS ?= 3
# Hyperparameter sweep of the SFT settings (configs/sweeps/sft.yaml, W&B's own sweep format). With W&B credentials
# (WANDB_API_KEY or `wandb login`) it is `wandb sweep` then `wandb agent --count $(TRIALS)`: W&B picks the values and
# the agent runs `lit-ft fit` with them. Without credentials it runs $(TRIALS) local trials through the same command
# expansion, each a W&B offline run, and prints the ranking. The venv's bin goes first on PATH so that the agent's
# `/usr/bin/env lit-ft` is this checkout's. `make sweep ARGS=--offline` forces the local run.
sweep: $(BASE)/config.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(LITFT) sweep configs/sweeps/sft.yaml --trials $(TRIALS) $(ARGS)

test:
	$(BIN)/pytest -q

test-all:
	$(BIN)/pytest -q --runslow

lint:
	$(BIN)/ruff check lit_ft tests bench

clean:
	rm -rf runs artifacts

# lit_ft SFT against TRL's SFTTrainer on the same model, data and LoRA (installs trl, the bench extra, when it is
# missing; needs ../shared/data and skips with a reason without it). Its last line is the throughput and memory ratio.
bench:
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q 'trl>=1.16,<2'   # the bench extra, not a runtime dependency
	$(BIN)/python bench/sft_vs_trl.py

# lit_ft GRPO against TRL's GRPOTrainer on the same model, prompts, G, max_new_tokens and steps (installs trl, the
# bench extra, when it is missing). Its last line is the samples-per-second and peak-memory ratio.
bench-rl:
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q 'trl>=1.16,<2'   # the bench extra, not a runtime dependency
	$(BIN)/python bench/grpo_vs_trl.py $(ARGS)

bench-packing:
	$(BIN)/python bench/packing.py

# The 7B recipe chain on one GPU, no network (a random Mistral-7B-shaped model saved in Hub format; SFT, RM, PPO,
# generate, then bench/sft_vs_trl.py): per stage the measured peak memory beside the estimate, tokens/s and MFU;
# report in runs/gpu_check/. <= 8 min on one H200. Without CUDA, the tiny variant (the test suite runs it too).
gpu-check:
	$(BIN)/python bench/gpu_check.py $(ARGS)

# docs/memory.md: the estimate of each memory lever, and the loss of the lean 4-bit preparation against PEFT's
# (3 seeds x 100 steps in bf16 on CPU, ~15 min).
bench-memory:
	$(BIN)/python bench/memory_levers.py
	$(BIN)/python bench/lean_preparation_quality.py --threads 1

estimate:
	$(LITFT) estimate --config configs/mistral7b_qlora_alpaca.yaml
