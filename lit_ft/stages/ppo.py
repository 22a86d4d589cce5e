"""RLHF with PPO: one (optionally 4-bit) base model serves the policy, value, reference and reward roles.

The base weights exist once. Named LoRA adapters on it give the roles:

- ``policy``: the SFT adapter, trainable;
- ``value``: its own adapter plus a scalar head, trainable, initialised from the reward adapter and head;
- reference: the base with adapters disabled, or (``reference: adapter``) a frozen copy of the SFT adapter, for
  when the SFT adapter was merged into the base;
- ``reward``: the reward model's adapter and head, frozen; its stored mean and std normalise the scores.

Each training step is one rollout batch: sample responses to a batch of prompts, score them, turn scores and
the per-token KL to the reference into rewards, estimate advantages with GAE, then run ``ppo_epochs`` passes of
shuffled minibatch updates (manual optimisation). The maths lives in :mod:`lit_ft.rl.losses`, sampling and
the forward passes in :mod:`lit_ft.rl.rollout`.

``trainer.max_steps`` counts optimizer updates: rollout batches x ``ppo_epochs`` x minibatches per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_ft.backbone import (
    Backbone,
    BackboneModule,
    LoraSettings,
    active_adapter,
    add_adapter,
    build_model,
    load_adapter,
    save_adapter,
)
from lit_ft.backbone.roles import (
    POLICY,
    REFERENCE,
    add_policy,
    add_reference,
    check_reference,
    disable_dropout,
    train_only,
    warn_unmerged_reference,
)
from lit_ft.callbacks.checkpointing import check_between_rollouts
from lit_ft.callbacks.evaluation import EvaluationRoles, GenerationTable
from lit_ft.data.formats import Prompt
from lit_ft.errors import ConfigError
from lit_ft.padding import position_ids_from_mask
from lit_ft.rl.advantages import explained_variance, gae, masked_mean, masked_whiten
from lit_ft.rl.kl import AdaptiveKLController, FixedKLController
from lit_ft.rl.losses import (
    entropy_from_logits,
    eos_penalty,
    logprobs_from_logits,
    policy_loss,
    token_rewards,
    value_loss,
)
from lit_ft.rl.rewards import ProgrammaticReward
from lit_ft.rl.rollout import (
    Rollout,
    response_hidden,
    response_logits,
    restore_sampling_state,
    sample,
    sampling_state,
)
from lit_ft.stages.reward_model import RewardScorer, init_score_head, load_reward_model
from lit_ft.stages.run_contract import CheckpointContract
from lit_ft.stages.schedules import WarmupCosine, default_optimizer, lora_param_groups, optimizer_and_schedule

VALUE, REWARD = "value", "reward"
# Lightning warns that checkpoints of manual optimisation hold the state after the step; PPO's checkpoints are
# taken between rollout batches (see ``_check_checkpoint_interval``), where that is the state to resume from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
VALUE_HEAD_FILE = "value_head.safetensors"


def reward_mean_std(stats: dict[str, Any]) -> tuple[float, float]:
    """The reward model's stored score mean and std (0 and 1 when absent; std at least 1e-6)."""
    return float(stats.get("mean", 0.0)), max(float(stats.get("std", 1.0)), 1e-6)


def normalised_head_state(head: nn.Linear, stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state of a linear score head that outputs ``(head(x) - mean) / std``: the reward head rescaled so that a
    value head started from it predicts the normalised score on the rewards' scale, not the raw one."""
    mean, std = reward_mean_std(stats)
    weight = head.weight.detach() / std
    bias = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features, device=weight.device)
    return {"weight": weight.clone(), "bias": ((bias - mean) / std).clone()}


def _chunks(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


class PPO(CheckpointContract, BackboneModule, L.LightningModule):
    """PPO on the shared backbone (manual optimisation), with exact resume.

    Args:
        backbone: the base model (``pretrained``, quantisation, dtype, gradient checkpointing). Its ``lora``
            settings make any adapter that starts fresh (the policy without ``policy_adapter``, the value with
            ``value_init: fresh``).
        policy_adapter: the SFT adapter the policy starts from (required to exist when set).
        reward_model: the reward-model export (adapter, ``score_head.safetensors``, ``reward_stats.json``); None
            trains on the programmatic ``rewards`` alone.
        value_init: "reward" starts the value adapter and head from the reward model, the head rescaled to predict
            the normalised score the rewards use; "fresh" from scratch.
        reference: "base" (adapters disabled) or "adapter" (a frozen copy of ``reference_adapter``, default the
            policy adapter: for when the SFT adapter was merged into the base).
        reference_adapter: the adapter of the "adapter" reference.
        rewards: programmatic rewards (``class_path``), added to the reward-model score.
        reward_model_weight: weight of the normalised reward-model score (1.0).
        gold_reward: a hidden gold reward (``class_path``, e.g. :class:`lit_ft.rl.rewards.GoldReward`), for logging
            only: ``gold/score`` at each rollout beside the reward-model score, and the gold win-rate of the
            held-out evaluation. It never enters the reward PPO trains on (Gao et al. 2022's proxy-vs-gold set-up).
        optimizer: callable making the optimiser of the policy and value parameters.
        scheduler: callable making the LR scheduler (warm-up + cosine by default), stepped per update.
        kl_controller: the KL coefficient beta, fixed or adaptive (Ziegler et al. 2019); default fixed 0.05.
        kl_estimator: per-token KL estimator in the reward, "k1" (log-ratio) or "k3" (non-negative).
        temperature: sampling temperature; log-probs use logits divided by it too.
        top_p: nucleus sampling threshold (1.0: off).
        max_new_tokens: longest response.
        missing_eos_penalty: subtracted from the score of a response that ends without EOS (None: off).
        ppo_epochs: passes over each rollout batch (4: the InstructGPT/TRL default).
        minibatch_size: responses per optimizer update.
        forward_batch_size: responses per forward pass; gradients accumulate over a minibatch.
        gamma: discount (1.0: the episode is one response).
        lam: GAE lambda (0.95: TRL's default).
        clip_range: policy ratio clip (0.2: PPO paper).
        value_clip_range: value clip around the rollout's values (0.2), None for no clipping.
        vf_coef: weight of the value loss (0.1: TRL's default).
        entropy_coef: weight of an entropy bonus (0: off).
        max_grad_norm: gradient clipping by norm per update (1.0), None for no clipping.
        whiten_rewards: whiten the per-token rewards before GAE (off).
        sampling_seed: seed of the sampling and minibatch generator (checkpointed: exact resume); None takes
            the global seed (``seed_everything``), so one seed sets the whole run.
        num_eval: held-out prompts scored before and after training (greedy): exact match, gold win-rate, reward-model
            score and KL to the reference, overall and per task family; None for all.
        eval_batch_size: prompts per batch when scoring held-out prompts.
        num_logged_samples: generations per logged sample table.
        export_dir: where the policy adapter and the value adapter and head are written when training ends.
    """

    stage = "ppo"

    def __init__(
        self,
        backbone: Backbone | None = None,
        policy_adapter: str | None = "artifacts/sft/adapter",
        reward_model: str | None = "artifacts/rm",
        value_init: str = "reward",
        reference: str = "base",
        reference_adapter: str | None = None,
        rewards: list[ProgrammaticReward] | None = None,
        reward_model_weight: float = 1.0,
        gold_reward: ProgrammaticReward | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        kl_controller: FixedKLController | AdaptiveKLController | None = None,
        kl_estimator: str = "k1",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
        missing_eos_penalty: float | None = 1.0,
        ppo_epochs: int = 4,
        minibatch_size: int = 8,
        forward_batch_size: int = 8,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        value_clip_range: float | None = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        whiten_rewards: bool = False,
        sampling_seed: int | None = None,
        num_eval: int | None = 200,
        eval_batch_size: int = 64,
        num_logged_samples: int = 8,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "rewards", "kl_controller", "gold_reward"])
        self.automatic_optimization = False
        if value_init not in ("reward", "fresh"):
            raise ConfigError(f"value_init must be 'reward' or 'fresh', got {value_init!r}")
        check_reference(reference)
        if value_init == "reward" and reward_model is None:
            value_init = "fresh"
        if reward_model is None and not rewards:
            raise ConfigError("PPO needs a reward: set model.reward_model, model.rewards, or both")
        self.backbone = backbone or Backbone(lora=LoraSettings())
        self.policy_adapter, self.reward_model_dir = policy_adapter, reward_model
        self.value_init, self.reference = value_init, reference
        self.reference_adapter = reference_adapter or policy_adapter
        self.rewards = list(rewards or [])
        self.reward_model_weight = reward_model_weight
        self.gold_reward = gold_reward
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.kl_controller = kl_controller or FixedKLController(0.05)
        self.kl_estimator = kl_estimator
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.missing_eos_penalty = missing_eos_penalty
        self.ppo_epochs, self.minibatch_size, self.forward_batch_size = ppo_epochs, minibatch_size, forward_batch_size
        self.gamma, self.lam = gamma, lam
        self.clip_range, self.value_clip_range = clip_range, value_clip_range
        self.vf_coef, self.entropy_coef, self.max_grad_norm = vf_coef, entropy_coef, max_grad_norm
        self.whiten_rewards = whiten_rewards
        self.sampling_seed = sampling_seed
        self.num_eval, self.eval_batch_size = num_eval, eval_batch_size
        self.num_logged_samples = num_logged_samples
        self.export_dir = export_dir
        self._tokenizer = None
        self.model: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self.reward_head: nn.Linear | None = None
        self.reward_scorer: RewardScorer | None = None  # the reward model's own scorer (lit_ft.stages.reward_model)
        self.reward_stats: dict[str, Any] = {"mean": 0.0, "std": 1.0}
        self.generator = torch.Generator().manual_seed(
            torch.initial_seed() if sampling_seed is None else sampling_seed)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the base once and put the four roles on it (idempotent)."""
        if self.model is not None:
            return
        spec = self.backbone
        model = build_model(dataclasses.replace(self.load_spec(), lora=None, init_adapter=None), self.tokenizer,
                            device_map=self.quantized_device_map())
        fresh = spec.lora or LoraSettings()
        say = rank_zero_only(print)
        model, how = add_policy(model, self.policy_adapter, fresh)
        say(f"ppo: {how}")
        warn_unmerged_reference("ppo", self.reference, self.policy_adapter)
        hidden_size = model.get_input_embeddings().embedding_dim
        if self.reward_model_dir is not None:
            scorer = load_reward_model(model, self.reward_model_dir, REWARD)
            object.__setattr__(self, "reward_scorer", scorer)  # not a submodule: its model is self.model
            self.reward_head, self.reward_stats = scorer.head, dict(scorer.stats)
            say(f"ppo: reward model from {self.reward_model_dir} (normalised with mean "
                f"{self.reward_stats.get('mean', 0.0):.3f}, std {self.reward_stats.get('std', 1.0):.3f})")
        if self.value_init == "reward":
            model = load_adapter(model, self.reward_model_dir, VALUE, trainable=True)
            self.value_head = nn.Linear(hidden_size, 1)
            self.value_head.load_state_dict(normalised_head_state(self.reward_head, self.reward_stats))
        else:
            model = add_adapter(model, dataclasses.replace(fresh, adapter_name=VALUE))
            self.value_head = init_score_head(nn.Linear(hidden_size, 1))
        self.value_head.to(next(model.parameters()).device)
        model, _ = add_reference(model, self.reference, self.reference_adapter)
        model.set_adapter(POLICY)
        train_only(model, (POLICY, VALUE))  # PEFT's set_adapter also toggles requires_grad: set them once
        disable_dropout(model)  # dropout would make rollout and update log-probs disagree
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ forwards
    def _policy_logits(self, query, query_mask, response, response_mask, adapter: str | None = POLICY):
        """Logits / temperature at each response position, under ``adapter`` (None: adapters disabled)."""
        with active_adapter(self.model, adapter):
            hidden = response_hidden(self.model, query, query_mask, response, response_mask)
        return response_logits(self.model, hidden, self.temperature)

    def _values(self, query, query_mask, response, response_mask) -> torch.Tensor:
        with active_adapter(self.model, VALUE):
            hidden = response_hidden(self.model, query, query_mask, response, response_mask)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def _reference_adapter(self) -> str | None:
        return REFERENCE if self.reference == "adapter" else None

    @torch.no_grad()
    def reward_model_scores(self, query, query_mask, response, response_mask) -> torch.Tensor:
        """Normalised reward-model scores of prompt + response, read at the last response token."""
        ids = torch.cat([query, response], dim=1)
        mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
        return self.reward_scorer(ids, mask, position_ids_from_mask(mask), normalize=True)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], texts: list[str], query, query_mask, response, response_mask
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total score per response, and its parts (reward model, each programmatic reward)."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(texts), device=query.device)
        if self.reward_head is not None:
            parts["reward_model"] = self.reward_model_scores(query, query_mask, response, response_mask)
            total = total + self.reward_model_weight * parts["reward_model"]
        for reward in self.rewards:
            value = reward(prompts, texts).to(total.device, torch.float32)
            parts[getattr(reward, "name", type(reward).__name__)] = value
            total = total + value
        return total, parts

    # ------------------------------------------------------------ rollouts
    def _prompts_of(self, batch: dict[str, torch.Tensor]) -> list[Prompt]:
        datamodule = self.trainer.datamodule
        return [datamodule.train_prompts[int(i)] for i in batch["index"]]

    def _decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip()
                for row, m in zip(response, mask)]

    @torch.no_grad()
    def rollout(self, query: torch.Tensor, query_mask: torch.Tensor, prompts: list[Prompt]) -> Rollout:
        """Sample, score, and compute rewards, advantages and returns for one batch of prompts."""
        self.model.eval()
        with active_adapter(self.model, POLICY):
            samples = sample(self.model, query, query_mask, self.max_new_tokens, self.tokenizer.eos_token_id,
                             self.tokenizer.pad_token_id, self.temperature, self.top_p, self.generator)
        response, mask = samples.tokens, samples.mask
        logprobs, ref_logprobs, values = [], [], []
        for rows in _chunks(torch.arange(len(query)), self.forward_batch_size):
            args = (query[rows], query_mask[rows], response[rows], mask[rows])
            logprobs.append(logprobs_from_logits(self._policy_logits(*args), response[rows]))
            ref_logprobs.append(logprobs_from_logits(self._policy_logits(*args, adapter=self._reference_adapter()),
                                                     response[rows]))
            values.append(self._values(*args))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        texts = self._decode(response, mask)
        scores, parts = self.score(prompts, texts, query, query_mask, response, mask)
        scores = eos_penalty(scores, samples.ended_with_eos, self.missing_eos_penalty)
        fmask = mask.float()
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, fmask, self.kl_controller.beta, self.kl_estimator)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, fmask, shift_mean=False)
        advantages, returns = gae(rewards, values, fmask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, fmask)
        self.model.train()
        return Rollout(query, query_mask, response, mask, logprobs, ref_logprobs, values, advantages, returns,
                       scores, kl, texts, prompts, samples.ended_with_eos, parts)

    # -------------------------------------------------------------- updates
    def ppo_update(self, r: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatch updates; returns the mean loss statistics."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(self.ppo_epochs):
            order = torch.randperm(len(r.query), generator=self.generator).to(r.query.device)
            for minibatch in _chunks(order, self.minibatch_size):
                tokens = r.mask[minibatch].sum().clamp(min=1)
                for rows in _chunks(minibatch, self.forward_batch_size):
                    weight = float(r.mask[rows].sum() / tokens)  # this chunk's share of the minibatch's tokens
                    for key, value in self._micro_step(r, rows, weight).items():
                        sums[key] = sums.get(key, 0.0) + value * weight
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                updates += 1
        return {key: value / max(1, updates) for key, value in sums.items()}

    def _micro_step(self, r: Rollout, rows: torch.Tensor, weight: float) -> dict[str, float]:
        args = (r.query[rows], r.query_mask[rows], r.response[rows], r.mask[rows])
        mask = r.mask[rows].float()
        logits = self._policy_logits(*args)
        logprobs = logprobs_from_logits(logits, r.response[rows])
        entropy = masked_mean(entropy_from_logits(logits), mask)
        pg_loss, clipfrac, approx_kl = policy_loss(logprobs, r.logprobs[rows], r.advantages[rows], mask,
                                                   self.clip_range)
        values = self._values(*args)
        vf_loss, vf_clipfrac = value_loss(values, r.values[rows], r.returns[rows], mask, self.value_clip_range)
        loss = pg_loss + self.vf_coef * vf_loss - self.entropy_coef * entropy
        self.manual_backward(loss * weight)
        stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, "clipfrac": clipfrac,
                 "approx_kl": approx_kl, "value_clipfrac": vf_clipfrac}
        return {key: float(value.detach()) if torch.is_tensor(value) else float(value) for key, value in stats.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        start = time.perf_counter()
        r = self.rollout(batch["input_ids"], batch["attention_mask"], self._prompts_of(batch))
        generated = time.perf_counter()
        stats = self.ppo_update(r)
        trained = time.perf_counter()
        fmask = r.mask.float()
        seq_kl = (r.kl * fmask).sum(-1).mean()
        self.kl_controller.update(float(seq_kl), len(r.query))
        metrics = {f"train/{k}": v for k, v in stats.items()}
        metrics.update({
            "train/score": float(r.scores.mean()),
            "train/kl": float(seq_kl),
            "train/kl_coef": float(self.kl_controller.beta),
            "train/response_length": float(r.mask.sum(-1).float().mean()),
            "train/eos_rate": float(r.ended_with_eos.float().mean()),
            "train/explained_variance": float(explained_variance(r.values, r.returns, fmask)),
            "train/rollout_entropy_bound": float(-masked_mean(r.logprobs, fmask)),
            "time/generation_share": (generated - start) / max(trained - start, 1e-9),
            # the throughput callback counts prompt tokens only: these are the sampled ones, per second of the step
            "throughput/response_tokens_per_s": float(r.mask.sum()) / max(trained - start, 1e-9),
            "time/rollout_s": generated - start,
            "time/update_s": trained - generated,
        })
        metrics.update({f"train/score_{k}": float(v.mean()) for k, v in r.score_parts.items()})
        metrics.update(self._gold_metrics(r))
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=len(r.query))
        self.log("score", metrics["train/score"], prog_bar=True, on_step=True, logger=False)
        self.log("kl", metrics["train/kl"], prog_bar=True, on_step=True, logger=False)
        if "gold/score" in metrics:
            self.log("gold", metrics["gold/score"], prog_bar=True, on_step=True, logger=False)
        if batch_idx % 10 == 0:
            self._log_samples(r)

    def _gold_metrics(self, r: Rollout) -> dict[str, float]:
        """``gold/score`` (and ``gold/win_rate`` when the gold reward has a top score) of the rollout's samples:
        computed after the rewards and advantages, for the log only."""
        if self.gold_reward is None:
            return {}
        gold = self.gold_reward(r.prompts, r.texts).float()
        out = {"gold/score": float(gold.mean())}
        top = getattr(self.gold_reward, "top_score", None)
        if top is not None:
            out["gold/win_rate"] = float((gold >= top).float().mean())
        return out

    def _log_samples(self, r: Rollout) -> None:
        rows = [[p.text[-200:], t, float(s)] for p, t, s in zip(r.prompts, r.texts, r.scores)]
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text("samples", columns=["prompt", "response", "score"],
                                data=rows[: self.num_logged_samples], step=self.global_step)

    # ------------------------------------------------------------ evaluation
    def evaluation_roles(self) -> EvaluationRoles:
        """The held-out evaluation's roles (:mod:`lit_ft.callbacks.evaluation`): the policy adapter, the reference
        (the frozen SFT adapter or the bare base) for the KL at the sampling temperature, and the reward model's
        own scorer, normalised with its stored statistics."""
        reference = self._reference_adapter()
        scorer = None
        if self.reward_scorer is not None:
            scorer = functools.partial(self.reward_scorer, normalize=True)
        return EvaluationRoles(
            self.model, self.tokenizer, policy=lambda: active_adapter(self.model, POLICY),
            reference=lambda: active_adapter(self.model, reference), scorer=scorer, temperature=self.temperature,
            names=("SFT policy", "PPO policy"), max_new_tokens=self.max_new_tokens)

    def configure_callbacks(self) -> list[L.Callback]:
        """The held-out evaluation with PPO's settings (``num_eval``, ``eval_batch_size``); it replaces a
        :class:`GenerationTable` of the trainer's."""
        return GenerationTable.for_stage(self.num_eval, self.eval_batch_size, self.max_new_tokens)

    def on_train_start(self) -> None:
        self._check_checkpoint_interval()

    def _check_checkpoint_interval(self) -> None:
        """Checkpoints must fall on rollout boundaries: every_n_train_steps a multiple of updates per batch."""
        datamodule = self.trainer.datamodule
        batch = getattr(datamodule, "micro_batch_size", self.minibatch_size)
        per_batch = self.ppo_epochs * math.ceil(batch / self.minibatch_size)
        check_between_rollouts(self.trainer, per_batch, "ppo_epochs x minibatches")

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.export_dir:
            print(f"lit_ft: saved the PPO policy and value to {self.export(self.export_dir)}")

    # ------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_and_schedule(lora_param_groups(self, self.backbone.lora), self.optimizer_fn,
                                      self.scheduler_fn, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Trainable adapters and value head, plus what makes resume exact: KL controller and RNG states."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {"kl_controller": self.kl_controller.state_dict(), **sampling_state(self.generator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint the config does not continue
        state = checkpoint.get("ppo")
        if state is None:
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        restore_sampling_state(self.generator, state)

    def export(self, directory: str) -> Path:
        """``policy/`` (PEFT adapter + tokenizer) and ``value/`` (adapter + ``value_head.safetensors``)."""
        from safetensors.torch import save_file

        out = Path(directory)
        record = self.base_record()
        save_adapter(self.model, out / POLICY, POLICY, self.tokenizer, record)
        value_dir = save_adapter(self.model, out / VALUE, VALUE, base=record)
        head = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(head, value_dir / VALUE_HEAD_FILE)
        return out
