# lit_ft: `make install`, then `make sft` (embedded default, no GPU, no network), `make test`. `make` alone: help.
# A target's line in `make help` is its `## ` comment: `name: prerequisites ## what it does`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LITFT := $(BIN)/lit-ft
BASE := artifacts/base/tiny-mistral
SFT_ADAPTER := artifacts/sft/adapter/adapter_config.json
RM_EXPORT := artifacts/rm/reward_stats.json
PAIRS := artifacts/pairs/train.jsonl artifacts/pairs/heldout.jsonl
ARGS ?=

.PHONY: help install pretrain sft pairs rm ppo dpo grpo pipeline test test-all bench bench-rl bench-packing bench-memory gpu-check estimate sweep lint clean
.DEFAULT_GOAL := help

help: ## list the targets (this)
	@echo "usage: make TARGET [ARGS='--key=value ...']   (ARGS: extra lit-ft options, e.g. ARGS=--trainer.max_steps=50)"
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z0-9_-]+):.*## (.*)/\1|\2/' | awk -F'|' '{printf "  %-15s %s\n", $$1, $$2}'

install: ## create .venv and install lit_ft with its dev tools (torch CPU wheel without CUDA)
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

pretrain: ## pre-train the embedded tiny base (artifacts/base/tiny-mistral, ~8 min on 2 cores)
	$(LITFT) fit --config configs/pretrain.yaml $(ARGS)

sft: $(BASE)/config.json ## LoRA SFT on the embedded tasks (runs/sft, artifacts/sft/adapter)
	$(LITFT) fit --config configs/sft.yaml $(ARGS)

# Stage outputs that later stages start from: built once when absent (`make sft` / `make rm` retrain on demand).
$(SFT_ADAPTER): $(BASE)/config.json
	$(LITFT) fit --config configs/sft.yaml

$(RM_EXPORT): $(PAIRS)
	$(LITFT) fit --config configs/rm.yaml

# The reward model's pairs: the SFT policy's own answers (8 a question at temperature 0.7), every two that the gold
# judge ranks differently a pair. Training questions (the SFT ones and 4000 fresh ones) and held-out questions go
# to separate files. Made again whenever the SFT adapter is newer than they are. PAIRS_ARGS: more lit-ft pairs
# options, e.g. PAIRS_ARGS=--samples=16.
artifacts/pairs/%.jsonl: $(SFT_ADAPTER)
	$(LITFT) pairs --adapter artifacts/sft/adapter --embedded $* $(if $(filter train,$*),--extra_facts 4000) --out $@ $(PAIRS_ARGS)

pairs: $(SFT_ADAPTER) ## the reward model's pairs: the SFT policy's samples ranked by the gold judge (artifacts/pairs)
	rm -f $(PAIRS)
	$(MAKE) $(PAIRS)

# The reward model starts from the SFT adapter; its pairs are made first when absent or older than the adapter.
rm: $(PAIRS) ## reward model on the judged pairs (runs/rm, artifacts/rm)
	$(LITFT) fit --config configs/rm.yaml $(ARGS)

# PPO of the SFT policy against the reward model (both made first when absent).
ppo: $(SFT_ADAPTER) $(RM_EXPORT) ## PPO of the SFT policy against the reward model (runs/ppo, artifacts/ppo)
	$(LITFT) fit --config configs/ppo.yaml $(ARGS)

# DPO of the SFT policy on the preference pairs, no reward model (the SFT adapter is made first when absent).
dpo: $(SFT_ADAPTER) ## DPO of the SFT policy on gold-labelled pairs, no reward model (runs/dpo, artifacts/dpo)
	$(LITFT) fit --config configs/dpo.yaml $(ARGS)

# GRPO of the SFT policy with programmatic rewards (the SFT adapter made first when absent): no reward model.
grpo: $(SFT_ADAPTER) ## GRPO of the SFT policy with programmatic rewards, G samples per prompt (runs/grpo)
	$(LITFT) fit --config configs/grpo.yaml $(ARGS)

# The whole post-training pipeline on the embedded default: pre-train (once), SFT, the SFT policy's judged pairs,
# reward model, PPO.
pipeline: ## sft, pairs, rm, then ppo
	$(MAKE) sft
	$(MAKE) pairs
	$(MAKE) rm
	$(MAKE) ppo

TRIALS ?= 3
# Hyperparameter sweep of the SFT settings (sweeps/sft.yaml, W&B's own sweep format). With W&B credentials
# (WANDB_API_KEY or `wandb login`) it is `wandb sweep` then `wandb agent --count $(TRIALS)`: W&B picks the values and
# the agent runs `lit-ft fit` with them. Without credentials it runs $(TRIALS) local trials through the same command
# expansion, each a W&B offline run, and prints the ranking. The venv's bin goes first on PATH so that the agent's
# `/usr/bin/env lit-ft` is this checkout's. `make sweep ARGS=--offline` forces the local run.
sweep: $(BASE)/config.json ## SFT hyperparameter sweep (sweeps/sft.yaml; TRIALS=3; offline without W&B)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(LITFT) sweep sweeps/sft.yaml --trials $(TRIALS) $(ARGS)

test: ## the test suite without slow tests (~4 min)
	$(BIN)/pytest -q

test-all: ## every test, slow ones too
	$(BIN)/pytest -q --runslow

lint: ## ruff
	$(BIN)/ruff check lit_ft tests bench

clean: ## delete runs/ and artifacts/
	rm -rf runs artifacts

# lit_ft SFT against TRL's SFTTrainer on the same model, data and LoRA (installs trl, the bench extra, when it is
# missing; needs ../shared/data and skips with a reason without it). Its last line is the throughput and memory ratio.
bench: ## lit_ft SFT against TRL's SFTTrainer (throughput and memory ratio)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q 'trl>=1.16,<2'   # the bench extra, not a runtime dependency
	$(BIN)/python bench/sft_vs_trl.py

# lit_ft GRPO against TRL's GRPOTrainer on the same model, prompts, G, max_new_tokens and steps (installs trl, the
# bench extra, when it is missing). Its last line is the samples-per-second and peak-memory ratio.
bench-rl: ## lit_ft GRPO against TRL's GRPOTrainer (samples/s and peak memory ratios)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q 'trl>=1.16,<2'   # the bench extra, not a runtime dependency
	$(BIN)/python bench/grpo_vs_trl.py $(ARGS)

bench-packing: ## packing against padding
	$(BIN)/python bench/packing.py

# The 7B recipe chain on one GPU, no network (a random Mistral-7B-shaped model saved in Hub format; SFT, RM, PPO,
# generate, then bench/sft_vs_trl.py): per stage the measured peak memory beside the estimate, tokens/s and MFU;
# report in runs/gpu_check/. <= 8 min on one H200. Without CUDA, the tiny variant (the test suite runs it too).
gpu-check: ## the 7B recipe chain on one GPU with a random 7B-shaped model (tiny variant on CPU)
	$(BIN)/python bench/gpu_check.py $(ARGS)

# docs/memory.md: the estimate of each memory lever, and the loss of the lean 4-bit preparation against PEFT's
# (3 seeds x 100 steps in bf16 on CPU, ~15 min).
bench-memory: ## docs/memory.md: memory levers and the lean 4-bit preparation's loss (~15 min)
	$(BIN)/python bench/memory_levers.py
	$(BIN)/python bench/lean_preparation_quality.py --threads 1

estimate: ## training memory of the 7B SFT recipe, from its config
	$(LITFT) estimate --config configs/mistral7b_qlora_alpaca.yaml
