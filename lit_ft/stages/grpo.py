"""Group-relative policy optimisation (GRPO, Dr. GRPO, RLOO) on the shared backbone: no value model.

Each training step is one rollout batch: B prompts, G samples each from one shared prefill per prompt
(:func:`lit_ft.rl.rollout.sample` with ``num_samples=G``), scored by programmatic rewards (``class_path``) and/or
the reward model, each logged on its own. A sample's advantage is its reward against its group's
(:func:`lit_ft.rl.advantages.group_advantages`: GRPO's mean and std, Dr. GRPO without the std, RLOO's
leave-one-out mean). Then ``grpo.num_iterations`` (mu) passes of the clipped ratio objective over the batch,
optionally with ``kl.beta`` x the k3 KL to the reference per token (:func:`lit_ft.rl.losses.group_policy_loss`),
reduced per sequence (GRPO), per token (DAPO) or by a constant (Dr. GRPO).

The roles on one base: ``policy`` is the SFT adapter (trainable); the reference is a frozen copy of it
(``reference: adapter``) or the base with adapters disabled (``reference: base``); training runs it only when
beta > 0, and its adapter is loaded only then or for the held-out evaluation's KL (``evaluation.kl``). The reward model,
when given, is its own frozen adapter and head. The held-out before/after table is the shared
:class:`lit_ft.callbacks.evaluation.GenerationTable` (gold win-rate from the data's judge, exact match, KL).

Two passes over a batch are skipped when they cannot matter, as TRL does: with mu = 1 and one update per batch
the "old" log-probs of the ratio are the update's own, detached (the ratio is 1), so no separate pass computes
them; with beta = 0 no reference pass is made.

The settings come in typed groups: ``sampling`` (:class:`lit_ft.rl.rollout.SamplingSettings`, shared with PPO),
``grpo`` (:class:`GRPOSettings`), ``kl`` (:class:`lit_ft.rl.kl.KLLossSettings`) and ``evaluation``
(:class:`GRPOEvaluation`). What GRPO shares with PPO (rewards, sampling, minibatch updates, evaluation, checkpoint
state) lives in :mod:`lit_ft.stages.rollout_stage`.

``trainer.max_steps`` counts optimizer updates: rollout batches x mu x minibatches per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_ft.backbone import Backbone, save_adapter
from lit_ft.backbone.roles import POLICY, Reference
from lit_ft.data.formats import Prompt
from lit_ft.errors import ConfigError, check_choice
from lit_ft.rl.advantages import (
    AdvantageBaseline,
    RewardScale,
    group_advantages,
    group_reward_stats,
    masked_mean,
)
from lit_ft.rl.kl import KLLossSettings
from lit_ft.rl.losses import (
    LossNormalisation,
    entropy_from_logits,
    eos_penalty,
    group_policy_loss,
    token_logprobs,
)
from lit_ft.rl.rewards import ProgrammaticReward
from lit_ft.rl.rollout import GroupRollout, SamplingSettings
from lit_ft.stages.rollout_stage import Chunk, EvaluationSettings, RolloutStage, chunks, updates_per_pass
from lit_ft.stages.schedules import WarmupCosine, default_optimizer

ENTROPY_ROWS = 4  # rows per entropy computation: its (rows, T, V) temporaries stay small beside the logits


@dataclass(frozen=True)
class GRPOSettings:
    """The group-relative update (``model.grpo``): G samples per prompt, their advantages against the group, and
    ``num_iterations`` passes of the clipped objective.

    Args:
        num_generations: G, samples per prompt (8: TRL's default; a group needs 2).
        baseline: "group_mean" (GRPO) or "leave_one_out" (RLOO: the mean of the other G - 1 samples). "group_mean":
            the GRPO paper's.
        scale_rewards: "group" divides by the group's std (GRPO), "none" does not (Dr. GRPO, and RLOO as
            published), "batch" by the std of the whole batch. TRL's ``scale_rewards``, and its default "group".
        loss_type: "grpo" (each sequence's token mean, then the mean over sequences), "dapo" (sum over tokens /
            tokens) or "dr_grpo" (sum over tokens / (sequences x max_new_tokens)). "grpo": the GRPO paper's.
        num_iterations: mu, passes of the clipped objective over each rollout batch (1: TRL's default; the ratio
            is then 1 and the clip inactive unless a batch takes several updates).
        clip_range: epsilon of the ratio clip (0.2: PPO and GRPO papers, TRL's ``epsilon``).
        clip_range_high: the upper clip (DAPO's "clip-higher", 0.28 there); None: ``clip_range``.
        minibatch_size: responses per optimizer update; None: the whole rollout batch (B x G) in one update, as
            TRL's default of one update per generation.
        forward_batch_size: responses per forward pass; gradients accumulate over a minibatch (16: two groups of
            8 per pass on the tiny model; the 7B recipe sets 8).
        max_grad_norm: gradient clipping by norm per update (1.0: transformers' and TRL's default), None for no
            clipping.
    """

    num_generations: int = 8
    baseline: AdvantageBaseline = "group_mean"
    scale_rewards: RewardScale = "group"
    loss_type: LossNormalisation = "grpo"
    num_iterations: int = 1
    clip_range: float = 0.2
    clip_range_high: float | None = None
    minibatch_size: int | None = None
    forward_batch_size: int = 16
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"model.grpo.num_generations must be at least 2 (a group), got {self.num_generations}")
        if self.num_iterations < 1:
            raise ConfigError(f"model.grpo.num_iterations must be at least 1, got {self.num_iterations}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ConfigError(f"model.grpo.minibatch_size must be at least 1 (or null), got {self.minibatch_size}")
        check_choice("model.grpo.baseline", self.baseline, AdvantageBaseline)
        check_choice("model.grpo.scale_rewards", self.scale_rewards, RewardScale)
        check_choice("model.grpo.loss_type", self.loss_type, LossNormalisation)


@dataclass(frozen=True)
class GRPOEvaluation(EvaluationSettings):
    """:class:`lit_ft.stages.rollout_stage.EvaluationSettings` and the KL of the held-out answers.

    Args:
        kl: report the exact KL of the policy to the reference along the held-out answers (True: the KL is how far
            training moved the policy). At beta = 0 this loads the reference adapter for the evaluation alone;
            training still makes no reference pass. Skipped for a fresh policy with ``reference: adapter`` at
            beta = 0 (there is no adapter to copy).
    """

    kl: bool = True


torch.serialization.add_safe_globals([GRPOSettings, GRPOEvaluation])  # modules built in Python checkpoint them

# GRPO's default groups (frozen: one instance serves every module).
SAMPLING, GRPO_SETTINGS, KL, EVALUATION = SamplingSettings(), GRPOSettings(), KLLossSettings(), GRPOEvaluation()


class GRPO(RolloutStage):
    """GRPO / Dr. GRPO / RLOO on the shared backbone (manual optimisation), with exact resume.

    Args:
        backbone: the base model; its ``lora`` settings make the policy adapter when ``policy_adapter`` is None.
        policy_adapter: the SFT adapter the policy starts from (required to exist when set).
        reference: "adapter" (a frozen copy of ``policy_adapter``: the SFT model, when the SFT adapter is not
            merged into the base) or "base" (adapters disabled). Run in training only when ``kl.beta`` > 0.
        rewards: programmatic rewards (``class_path``: exact match, format, the gold judge ...), added up.
        reward_model: a reward-model export (its normalised score is added, times ``reward_model_weight``), or
            None for the programmatic rewards alone.
        reward_model_weight: weight of the normalised reward-model score (1.0).
        optimizer: callable making the optimiser from the policy adapter's parameters.
        scheduler: callable making the LR scheduler (warm-up + cosine by default), stepped per update.
        sampling: temperature, top-p, response length, missing-EOS penalty (off) and seed of the rollouts
            (:class:`lit_ft.rl.rollout.SamplingSettings`).
        grpo: G, the advantage baseline and scale, the loss reduction, iterations, clipping and minibatches
            (:class:`GRPOSettings`).
        kl: beta and the estimator of the KL term in the loss (:class:`lit_ft.rl.kl.KLLossSettings`).
        evaluation: the held-out evaluation, its KL, and the sample tables (:class:`GRPOEvaluation`).
        export_dir: where the policy adapter (``policy/``) is written when training ends.
    """

    stage = "grpo"
    exported = "GRPO policy"

    def __init__(
        self,
        backbone: Backbone | None = None,
        policy_adapter: str | None = "artifacts/sft/adapter",
        reference: Reference = "adapter",
        rewards: list[ProgrammaticReward] | None = None,
        reward_model: str | None = None,
        reward_model_weight: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        sampling: SamplingSettings = SAMPLING,
        grpo: GRPOSettings = GRPO_SETTINGS,
        kl: KLLossSettings = KL,
        evaluation: GRPOEvaluation = EVALUATION,
        export_dir: str | None = None,
    ):
        super().__init__(backbone, policy_adapter, reference, rewards, reward_model, reward_model_weight, optimizer,
                         scheduler, sampling, grpo.forward_batch_size, evaluation, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "rewards"])
        if reference == "adapter" and policy_adapter is None and kl.beta > 0:
            raise ConfigError("reference: adapter needs model.policy_adapter (or use reference: base)")
        self.grpo, self.kl = grpo, kl

    # ------------------------------------------------------------------ model
    def _add_roles(self, model: nn.Module) -> nn.Module:
        """The reward model (when set) and the reference (when used) beside the policy."""
        self._add_reward_model(model)
        # No reference at all (not even its adapter) unless the KL term or the evaluation's KL reads it.
        if self.kl.beta > 0 or (self.evaluation.kl and (self.reference == "base" or self.policy_adapter is not None)):
            model = self._with_reference(model, self.policy_adapter)
        return model

    # ------------------------------------------------------------ forwards
    @torch.no_grad()
    def _logprobs(self, query, query_mask, response, response_mask, adapter: str | None) -> torch.Tensor:
        """Log-probs of the response tokens under ``adapter``, ``forward_batch_size`` rows per pass."""
        parts = []
        for rows in chunks(torch.arange(len(query), device=query.device), self.forward_batch_size):
            logits = self._logits(query[rows], query_mask[rows], response[rows], response_mask[rows], adapter=adapter)
            parts.append(token_logprobs(logits, response[rows]))
        return torch.cat(parts)

    # ------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, query: torch.Tensor, query_mask: torch.Tensor, prompts: list[Prompt]) -> GroupRollout:
        """G samples per prompt (one prefill each), their rewards and group advantages; the old and reference
        log-probs only where they are needed (see the module docstring)."""
        self.model.eval()
        g = self.grpo
        G = g.num_generations
        samples = self._sample(query, query_mask, num_samples=G)
        self._generation_s = time.perf_counter() - self._step_start
        query, query_mask = query.repeat_interleave(G, 0), query_mask.repeat_interleave(G, 0)
        response, mask = samples.tokens, samples.mask
        old = None
        if g.num_iterations > 1 or updates_per_pass(len(query), g.minibatch_size) > 1:
            old = self._logprobs(query, query_mask, response, mask, POLICY)
        ref = self._logprobs(query, query_mask, response, mask, self._reference_name) if self.kl.beta else None
        texts = self._decode(response, mask)
        rows = [p for p in prompts for _ in range(G)]
        rewards, parts = self.score(rows, texts, query, query_mask, response, mask)
        rewards = eos_penalty(rewards, samples.ended_with_eos, self.sampling.missing_eos_penalty)
        advantages = group_advantages(rewards, G, g.baseline, g.scale_rewards)
        self.model.train()
        return GroupRollout(query, query_mask, response, mask, old, ref, rewards, parts, advantages,
                            samples.ended_with_eos, texts, prompts, G)

    # -------------------------------------------------------------- updates
    def group_update(self, r: GroupRollout) -> dict[str, float]:
        """``grpo.num_iterations`` passes of shuffled minibatch updates; returns token-weighted mean statistics."""
        g = self.grpo
        return self.minibatch_updates(r.mask, g.num_iterations, g.minibatch_size or len(r.query), g.max_grad_norm,
                                      lambda chunk: self._micro_step(r, chunk))

    def _micro_step(self, r: GroupRollout, chunk: Chunk) -> dict[str, float]:
        """One forward/backward over the chunk's rows: its part of the minibatch loss (whole-minibatch normalisers)."""
        rows, g = chunk.rows, self.grpo
        mask = r.mask[rows]
        logits = self._logits(r.query[rows], r.query_mask[rows], r.response[rows], mask)
        logprobs = token_logprobs(logits, r.response[rows])
        old = logprobs.detach() if r.logprobs is None else r.logprobs[rows]
        ref = None if r.ref_logprobs is None else r.ref_logprobs[rows]
        out = group_policy_loss(logprobs, old, r.advantages[rows], mask, g.clip_range, g.loss_type,
                                g.clip_range_high, ref, self.kl.beta, self.kl.estimator, self.sampling.max_new_tokens,
                                num_sequences=chunk.sequences, num_tokens=chunk.tokens)
        self.manual_backward(out.loss)
        with torch.no_grad():  # a few rows at a time: a (rows, T, V) softmax copy would double the peak memory
            entropy = torch.cat([entropy_from_logits(part) for part in logits.detach().split(ENTROPY_ROWS)])
            entropy = masked_mean(entropy, mask)
        return {"loss": float(out.loss.detach()), "clipfrac": float(out.clipfrac), "kl": float(out.kl),
                "entropy": float(entropy)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        r = self.rollout(batch["input_ids"], batch["attention_mask"], self._prompts_of(batch))
        scored = time.perf_counter()
        stats = self.group_update(r)
        end = time.perf_counter()
        step_s = max(end - self._step_start, 1e-9)
        G = r.group_size
        metrics = {f"train/{k}": v for k, v in stats.items()}
        group = group_reward_stats(r.rewards, G)
        metrics.update({
            "train/reward": float(r.rewards.mean()),
            "train/reward_group_mean": float(group.mean.mean()),  # mean over groups of each group's mean
            "train/reward_group_std": float(group.std.mean()),  # mean over groups of each group's std
            "train/zero_signal_share": group.zero_signal,
            "train/response_length": float(r.mask.sum(-1).float().mean()),
            "train/eos_rate": float(r.ended_with_eos.float().mean()),
            "time/generation_share": self._generation_s / step_s,
            "time/rollout_s": scored - self._step_start,
            "time/update_s": end - scored,
            "throughput/samples_per_s": len(r.query) / step_s,
            "throughput/response_tokens_per_s": float(r.mask.sum()) / step_s,
        })
        for name, part in r.reward_parts.items():
            part_stats = group_reward_stats(part, G)
            metrics[f"train/rewards/{name}/mean"] = float(part.mean())
            metrics[f"train/rewards/{name}/group_std"] = float(part_stats.std.mean())
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=len(r.query))
        self.log("reward", metrics["train/reward"], prog_bar=True, on_step=True, logger=False)
        self.log("zero_signal", group.zero_signal, prog_bar=True, on_step=True, logger=False)
        if batch_idx % 10 == 0:
            self._log_sample_table([[r.prompts[i // G].text[-200:], t, float(s)]
                                    for i, (t, s) in enumerate(zip(r.texts, r.rewards))], "reward")

    updates_made_of = "grpo.num_iterations x minibatches"

    def updates_per_rollout(self) -> int:
        prompts = getattr(self.trainer.datamodule, "micro_batch_size", 1)
        return self.grpo.num_iterations * updates_per_pass(prompts * self.grpo.num_generations,
                                                           self.grpo.minibatch_size)

    # ------------------------------------------------------------ export
    def export(self, directory: str) -> Path:
        """``policy/``: the PEFT adapter, the tokenizer and the record of how the base was loaded."""
        out = Path(directory)
        save_adapter(self.model, out / POLICY, POLICY, self.tokenizer, self.base_record())
        return out
