"""RLHF with PPO: one (optionally 4-bit) base model serves the policy, value, reference and reward roles.

The base weights exist once. Named LoRA adapters on it give the roles:

- ``policy``: the SFT adapter, trainable;
- ``value``: its own adapter plus a scalar head, trainable, initialised from the reward adapter and head;
- reference: a frozen copy of the SFT adapter (``reference: adapter``: the SFT model while the SFT adapter is not
  merged into the base), or the base with adapters disabled (``reference: base``: right once it is merged);
- ``reward``: the reward model's adapter and head, frozen; its stored mean and std normalise the scores.

Each training step is one rollout batch: sample responses to a batch of prompts, score them, turn scores and
the per-token KL to the reference into rewards, estimate advantages with GAE, then run ``ppo.epochs`` passes of
shuffled minibatch updates (manual optimisation). The maths lives in :mod:`lit_ft.rl.losses`, sampling and
the forward passes in :mod:`lit_ft.rl.rollout`; what PPO shares with GRPO (rewards, sampling, minibatch updates,
evaluation, checkpoint state) in :mod:`lit_ft.stages.rollout_stage`.

The settings come in typed groups: ``sampling`` (:class:`lit_ft.rl.rollout.SamplingSettings`), ``ppo``
(:class:`PPOSettings`), ``kl`` (:class:`lit_ft.rl.kl.KLRewardSettings`) and ``evaluation``
(:class:`lit_ft.stages.rollout_stage.EvaluationSettings`).

``trainer.max_steps`` counts optimizer updates: rollout batches x ``ppo.epochs`` x minibatches per batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_ft.backbone import Backbone, LoraSettings, active_adapter, add_adapter, load_adapter, save_adapter
from lit_ft.backbone.roles import POLICY, Reference
from lit_ft.data.formats import Prompt
from lit_ft.errors import check_choice
from lit_ft.rl.advantages import explained_variance, gae, masked_mean, masked_whiten
from lit_ft.rl.kl import KLRewardSettings
from lit_ft.rl.losses import (
    entropy_from_logits,
    eos_penalty,
    logprobs_from_logits,
    policy_loss,
    token_rewards,
    value_loss,
)
from lit_ft.rl.rewards import ProgrammaticReward
from lit_ft.rl.rollout import Rollout, SamplingSettings, response_hidden
from lit_ft.stages.reward_model import init_score_head
from lit_ft.stages.rollout_stage import Chunk, EvaluationSettings, RolloutStage, chunks, updates_per_pass
from lit_ft.stages.schedules import WarmupCosine, default_optimizer

VALUE = "value"
VALUE_HEAD_FILE = "value_head.safetensors"
ValueInit = Literal["reward", "fresh"]


@dataclass(frozen=True)
class PPOSettings:
    """How PPO turns a rollout batch into updates (``model.ppo``): GAE, then ``epochs`` passes of clipped policy
    and value updates over shuffled minibatches.

    Args:
        epochs: passes over each rollout batch (4: the InstructGPT/TRL default).
        minibatch_size: responses per optimizer update (8: a small default for the tiny model; the embedded
            config sets 16).
        forward_batch_size: responses per forward pass; gradients accumulate over a minibatch (8: a whole default
            minibatch in one pass; the 7B recipe sets 4 to fit 24 GB).
        max_grad_norm: gradient clipping by norm per update (1.0: transformers' and TRL's default), None for no
            clipping.
        gamma: discount (1.0: the episode is one response, rewarded at its end).
        lam: GAE lambda (0.95: TRL's default).
        whiten_rewards: whiten the per-token rewards before GAE (off: TRL's default; the advantages are whitened
            either way).
        clip_range: policy ratio clip (0.2: the PPO paper's).
        value_clip_range: value clip around the rollout's values (0.2: TRL's ``cliprange_value``), None for no
            clipping.
        vf_coef: weight of the value loss (0.1: TRL's default).
        entropy_coef: weight of an entropy bonus (0: off, as in InstructGPT and TRL).
    """

    # the updates of one rollout batch
    epochs: int = 4
    minibatch_size: int = 8
    forward_batch_size: int = 8
    max_grad_norm: float | None = 1.0
    # the advantages
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    # the loss
    clip_range: float = 0.2
    value_clip_range: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0


torch.serialization.add_safe_globals([PPOSettings])  # modules built in Python keep it in their checkpoints

# PPO's default groups (frozen: one instance serves every module). Sampling penalises a response that never stops
# by 1.0, one unit of the normalised reward-model score, so that the policy learns to end its answers.
SAMPLING = SamplingSettings(missing_eos_penalty=1.0)
PPO_SETTINGS, KL, EVALUATION = PPOSettings(), KLRewardSettings(), EvaluationSettings()


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


class PPO(RolloutStage):
    """PPO on the shared backbone (manual optimisation), with exact resume.

    Args:
        backbone: the base model (``pretrained``, quantisation, dtype, gradient checkpointing). Its ``lora``
            settings make any adapter that starts fresh (the policy without ``policy_adapter``, the value with
            ``value_init: fresh``).
        policy_adapter: the SFT adapter the policy starts from (required to exist when set).
        reward_model: the reward-model export (adapter, ``score_head.safetensors``, ``reward_stats.json``); None
            trains on the programmatic ``rewards`` alone.
        value_init: "reward" starts the value adapter and head from the reward model, the head rescaled to predict
            the normalised score the rewards use (InstructGPT's choice); "fresh" from scratch.
        reference: "base" (adapters disabled) or "adapter" (a frozen copy of ``reference_adapter``, default the
            policy adapter: the SFT model, when the SFT adapter is not merged into the base).
        reference_adapter: the adapter of the "adapter" reference.
        rewards: programmatic rewards (``class_path``), added to the reward-model score.
        reward_model_weight: weight of the normalised reward-model score (1.0).
        gold_reward: a hidden gold reward (``class_path``, e.g. :class:`lit_ft.rl.rewards.GoldReward`), for logging
            only: ``gold/score`` at each rollout beside the reward-model score, and the gold win-rate of the
            held-out evaluation. It never enters the reward PPO trains on (Gao et al. 2022's proxy-vs-gold set-up).
        optimizer: callable making the optimiser of the policy and value parameters.
        scheduler: callable making the LR scheduler (warm-up + cosine by default), stepped per update.
        sampling: temperature, top-p, response length, missing-EOS penalty and seed of the rollouts
            (:class:`lit_ft.rl.rollout.SamplingSettings`; PPO's default penalises a missing EOS by 1.0, one unit of
            the normalised score, so that the policy learns to stop).
        ppo: epochs, minibatches, GAE and the loss coefficients (:class:`PPOSettings`).
        kl: the KL coefficient's controller and the per-token estimator (:class:`lit_ft.rl.kl.KLRewardSettings`).
        evaluation: the held-out evaluation and the sample tables
            (:class:`lit_ft.stages.rollout_stage.EvaluationSettings`).
        export_dir: where the policy adapter and the value adapter and head are written when training ends.
    """

    stage = "ppo"
    exported = "PPO policy and value"
    trainable_roles = (POLICY, VALUE)

    def __init__(
        self,
        backbone: Backbone | None = None,
        policy_adapter: str | None = "artifacts/sft/adapter",
        reward_model: str | None = "artifacts/rm",
        value_init: ValueInit = "reward",
        reference: Reference = "base",
        reference_adapter: str | None = None,
        rewards: list[ProgrammaticReward] | None = None,
        reward_model_weight: float = 1.0,
        gold_reward: ProgrammaticReward | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        sampling: SamplingSettings = SAMPLING,
        ppo: PPOSettings = PPO_SETTINGS,
        kl: KLRewardSettings = KL,
        evaluation: EvaluationSettings = EVALUATION,
        export_dir: str | None = None,
    ):
        super().__init__(backbone, policy_adapter, reference, rewards, reward_model, reward_model_weight, optimizer,
                         scheduler, sampling, ppo.forward_batch_size, evaluation, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "rewards", "gold_reward"])
        check_choice("model.value_init", value_init, ValueInit)
        self.value_init = "fresh" if reward_model is None else value_init
        self.reference_adapter = reference_adapter or policy_adapter
        self.gold_reward = gold_reward
        self.ppo, self.kl = ppo, kl
        self.kl_controller = kl.make_controller()
        self.value_head: nn.Linear | None = None
        self.reward_stats: dict[str, Any] = {"mean": 0.0, "std": 1.0}

    # ------------------------------------------------------------------ model
    def _add_roles(self, model: nn.Module) -> nn.Module:
        """The value, reference and reward roles beside the policy, on the one base."""
        hidden_size = model.get_input_embeddings().embedding_dim
        self._add_reward_model(model)
        if self.reward_scorer is not None:
            self.reward_stats = dict(self.reward_scorer.stats)
        if self.value_init == "reward":
            model = load_adapter(model, self.reward_model_dir, VALUE, trainable=True)
            self.value_head = nn.Linear(hidden_size, 1)
            self.value_head.load_state_dict(normalised_head_state(self.reward_head, self.reward_stats))
        else:
            model = add_adapter(model, dataclasses.replace(self.backbone.lora or LoraSettings(), adapter_name=VALUE))
            self.value_head = init_score_head(nn.Linear(hidden_size, 1))
        self.value_head.to(next(model.parameters()).device)
        return self._with_reference(model, self.reference_adapter)

    # ------------------------------------------------------------ forwards
    def _values(self, query, query_mask, response, response_mask) -> torch.Tensor:
        with active_adapter(self.model, VALUE):
            hidden = response_hidden(self.model, query, query_mask, response, response_mask)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # ------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, query: torch.Tensor, query_mask: torch.Tensor, prompts: list[Prompt]) -> Rollout:
        """Sample, score, and compute rewards, advantages and returns for one batch of prompts."""
        self.model.eval()
        samples = self._sample(query, query_mask)
        response, mask = samples.tokens, samples.mask
        logprobs, ref_logprobs, values = [], [], []
        for rows in chunks(torch.arange(len(query)), self.forward_batch_size):
            args = (query[rows], query_mask[rows], response[rows], mask[rows])
            logprobs.append(logprobs_from_logits(self._logits(*args), response[rows]))
            ref_logprobs.append(logprobs_from_logits(self._logits(*args, adapter=self._reference_name), response[rows]))
            values.append(self._values(*args))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        texts = self._decode(response, mask)
        scores, parts = self.score(prompts, texts, query, query_mask, response, mask)
        scores = eos_penalty(scores, samples.ended_with_eos, self.sampling.missing_eos_penalty)
        fmask = mask.float()
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, fmask, self.kl_controller.beta, self.kl.estimator)
        if self.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, fmask, shift_mean=False)
        advantages, returns = gae(rewards, values, fmask, self.ppo.gamma, self.ppo.lam)
        advantages = masked_whiten(advantages, fmask)
        self.model.train()
        return Rollout(query, query_mask, response, mask, logprobs, ref_logprobs, values, advantages, returns,
                       scores, kl, texts, prompts, samples.ended_with_eos, parts)

    # -------------------------------------------------------------- updates
    def ppo_update(self, r: Rollout) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled minibatch updates; returns the mean loss statistics."""
        p = self.ppo
        return self.minibatch_updates(r.mask, p.epochs, p.minibatch_size, p.max_grad_norm,
                                      lambda chunk: self._micro_step(r, chunk))

    def _micro_step(self, r: Rollout, chunk: Chunk) -> dict[str, float]:
        """One forward/backward over the chunk's rows: its token share of the minibatch's loss."""
        rows, p = chunk.rows, self.ppo
        args = (r.query[rows], r.query_mask[rows], r.response[rows], r.mask[rows])
        mask = r.mask[rows].float()
        logits = self._logits(*args)
        logprobs = logprobs_from_logits(logits, r.response[rows])
        entropy = masked_mean(entropy_from_logits(logits), mask)
        pg_loss, clipfrac, approx_kl = policy_loss(logprobs, r.logprobs[rows], r.advantages[rows], mask, p.clip_range)
        values = self._values(*args)
        vf_loss, vf_clipfrac = value_loss(values, r.values[rows], r.returns[rows], mask, p.value_clip_range)
        loss = pg_loss + p.vf_coef * vf_loss - p.entropy_coef * entropy
        self.manual_backward(loss * chunk.weight)
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
            self._log_sample_table([[p.text[-200:], t, float(s)] for p, t, s in zip(r.prompts, r.texts, r.scores)],
                                   "score")

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

    updates_made_of = "ppo.epochs x minibatches"

    def updates_per_rollout(self) -> int:
        prompts = getattr(self.trainer.datamodule, "micro_batch_size", self.ppo.minibatch_size)
        return self.ppo.epochs * updates_per_pass(prompts, self.ppo.minibatch_size)

    # ------------------------------------------------------------ checkpoints
    def _rollout_state(self) -> dict[str, Any]:
        """The KL controller's beta (adaptive: it moved), beside the sampling state."""
        return {"kl_controller": self.kl_controller.state_dict()}

    def _restore_rollout_state(self, state: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])

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
