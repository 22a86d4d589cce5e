"""Group-relative policy optimisation (GRPO, Dr. GRPO, RLOO) on the shared backbone: no value model.

Each training step is one rollout batch: B prompts, G samples each from one shared prefill per prompt
(:func:`lit_ft.rl.rollout.sample` with ``num_samples=G``), scored by programmatic rewards (``class_path``) and/or
the reward model, each logged on its own. A sample's advantage is its reward against its group's
(:func:`lit_ft.rl.advantages.group_advantages`: GRPO's mean and std, Dr. GRPO without the std, RLOO's
leave-one-out mean). Then ``num_iterations`` (mu) passes of the clipped ratio objective over the batch, optionally
with beta x the k3 KL to the reference per token (:func:`lit_ft.rl.losses.group_policy_loss`), reduced per
sequence (GRPO), per token (DAPO) or by a constant (Dr. GRPO).

The roles on one base: ``policy`` is the SFT adapter (trainable); the reference is a frozen copy of it
(``reference: adapter``) or the base with adapters disabled (``reference: base``); training runs it only when
beta > 0, and its adapter is loaded only then or for the held-out evaluation's KL (``eval_kl``). The reward model,
when given, is its own frozen adapter and head. The held-out before/after table is the shared
:class:`lit_ft.callbacks.evaluation.GenerationTable` (gold win-rate from the data's judge, exact match, KL).

Two passes over a batch are skipped when they cannot matter, as TRL does: with mu = 1 and one update per batch
the "old" log-probs of the ratio are the update's own, detached (the ratio is 1), so no separate pass computes
them; with beta = 0 no reference pass is made.

``trainer.max_steps`` counts optimizer updates: rollout batches x mu x minibatches per batch.
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

from lit_ft.backbone import Backbone, BackboneModule, LoraSettings, active_adapter, build_model, save_adapter
from lit_ft.backbone.roles import (
    POLICY,
    Reference,
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
from lit_ft.rl.advantages import (
    AdvantageBaseline,
    RewardScale,
    group_advantages,
    group_reward_stats,
    masked_mean,
)
from lit_ft.rl.kl import KLEstimator
from lit_ft.rl.losses import (
    LossNormalisation,
    entropy_from_logits,
    eos_penalty,
    group_policy_loss,
    token_logprobs,
)
from lit_ft.rl.rewards import ProgrammaticReward
from lit_ft.rl.rollout import (
    GroupRollout,
    response_hidden,
    response_logits,
    restore_sampling_state,
    sample,
    sampling_state,
)
from lit_ft.stages.reward_model import RewardScorer, load_reward_model
from lit_ft.stages.run_contract import CheckpointContract
from lit_ft.stages.schedules import WarmupCosine, default_optimizer, lora_param_groups, optimizer_and_schedule

REWARD = "reward"
ENTROPY_ROWS = 4  # rows per entropy computation: its (rows, T, V) temporaries stay small beside the logits
# Checkpoints are taken between rollout batches (``_check_checkpoint_interval``): the state after the step is the
# one to resume from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _chunks(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


class GRPO(CheckpointContract, BackboneModule, L.LightningModule):
    """GRPO / Dr. GRPO / RLOO on the shared backbone (manual optimisation), with exact resume.

    Args:
        backbone: the base model; its ``lora`` settings make the policy adapter when ``policy_adapter`` is None.
        policy_adapter: the SFT adapter the policy starts from (required to exist when set).
        reference: "adapter" (a frozen copy of ``policy_adapter``: the SFT model, when the SFT adapter is not
            merged into the base) or "base" (adapters disabled). Run in training only when ``beta`` > 0.
        rewards: programmatic rewards (``class_path``: exact match, format, the gold judge ...), added up.
        reward_model: a reward-model export (its normalised score is added, times ``reward_model_weight``), or
            None for the programmatic rewards alone.
        reward_model_weight: weight of the normalised reward-model score (1.0).
        num_generations: G, samples per prompt (8: TRL's default; a group needs 2).
        baseline: "group_mean" (GRPO) or "leave_one_out" (RLOO: the mean of the other G - 1 samples).
        scale_rewards: "group" divides by the group's std (GRPO), "none" does not (Dr. GRPO, and RLOO as
            published), "batch" by the std of the whole batch. TRL's ``scale_rewards``.
        loss_type: "grpo" (each sequence's token mean, then the mean over sequences), "dapo" (sum over tokens /
            tokens) or "dr_grpo" (sum over tokens / (sequences x max_new_tokens)). "grpo": the GRPO paper's.
        num_iterations: mu, passes of the clipped objective over each rollout batch (1: TRL's default; the ratio
            is then 1 and the clip inactive unless a batch takes several updates).
        clip_range: epsilon of the ratio clip (0.2: PPO and GRPO papers, TRL's ``epsilon``).
        clip_range_high: the upper clip (DAPO's "clip-higher", 0.28 there); None: ``clip_range``.
        beta: coefficient of the per-token KL to the reference in the loss (0.0: TRL's default since DAPO and
            Dr. GRPO showed it unneeded with verifiable rewards; 0 makes no reference pass at all).
        kl_estimator: "k3" (GRPO's, non-negative) or "k1".
        temperature: sampling temperature; log-probs use logits divided by it too.
        top_p: nucleus sampling threshold (1.0: off).
        max_new_tokens: longest response (also Dr. GRPO's constant).
        missing_eos_penalty: subtracted from the reward of a response that ends without EOS (None: off).
        minibatch_size: responses per optimizer update; None: the whole rollout batch (B x G) in one update.
        forward_batch_size: responses per forward pass; gradients accumulate over a minibatch.
        max_grad_norm: gradient clipping by norm per update (1.0), None for no clipping.
        sampling_seed: seed of the sampling and minibatch generator (checkpointed: exact resume); None takes the
            global seed, so one ``seed_everything`` sets the whole run.
        num_eval: held-out prompts answered greedily before and after training, None for all.
        eval_batch_size: prompts per batch when answering held-out prompts.
        eval_kl: report the exact KL of the policy to the reference along the held-out answers (True). At beta = 0
            this loads the reference adapter for the evaluation alone; training still makes no reference pass.
            Skipped for a fresh policy with ``reference: adapter`` at beta = 0 (there is no adapter to copy).
        num_logged_samples: generations per logged sample table.
        export_dir: where the policy adapter (``policy/``) is written when training ends.
    """

    stage = "grpo"

    def __init__(
        self,
        backbone: Backbone | None = None,
        policy_adapter: str | None = "artifacts/sft/adapter",
        reference: Reference = "adapter",
        rewards: list[ProgrammaticReward] | None = None,
        reward_model: str | None = None,
        reward_model_weight: float = 1.0,
        num_generations: int = 8,
        baseline: AdvantageBaseline = "group_mean",
        scale_rewards: RewardScale = "group",
        loss_type: LossNormalisation = "grpo",
        num_iterations: int = 1,
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
        missing_eos_penalty: float | None = None,
        minibatch_size: int | None = None,
        forward_batch_size: int = 16,
        max_grad_norm: float | None = 1.0,
        sampling_seed: int | None = None,
        num_eval: int | None = 200,
        eval_batch_size: int = 64,
        eval_kl: bool = True,
        num_logged_samples: int = 8,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "rewards"])
        self.automatic_optimization = False
        if reward_model is None and not rewards:
            raise ConfigError("GRPO needs a reward: set model.rewards, model.reward_model, or both")
        if num_generations < 2:
            raise ConfigError(f"model.num_generations must be at least 2 (a group), got {num_generations}")
        if num_iterations < 1:
            raise ConfigError(f"model.num_iterations must be at least 1, got {num_iterations}")
        if minibatch_size is not None and minibatch_size < 1:
            raise ConfigError(f"model.minibatch_size must be at least 1 (or null), got {minibatch_size}")
        if beta < 0:
            raise ConfigError(f"model.beta must be >= 0, got {beta}")
        check_reference(reference)
        if reference == "adapter" and policy_adapter is None and beta > 0:
            raise ConfigError("reference: adapter needs model.policy_adapter (or use reference: base)")
        self.backbone = backbone or Backbone(lora=LoraSettings())
        self.policy_adapter, self.reference = policy_adapter, reference
        self.rewards = list(rewards or [])
        self.reward_model_dir, self.reward_model_weight = reward_model, reward_model_weight
        self.num_generations, self.baseline, self.scale_rewards = num_generations, baseline, scale_rewards
        self.loss_type, self.num_iterations = loss_type, num_iterations
        self.clip_range, self.clip_range_high = clip_range, clip_range_high
        self.beta, self.kl_estimator = beta, kl_estimator
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.missing_eos_penalty = missing_eos_penalty
        self.minibatch_size, self.forward_batch_size = minibatch_size, forward_batch_size
        self.max_grad_norm = max_grad_norm
        self.num_eval, self.eval_batch_size, self.eval_kl = num_eval, eval_batch_size, eval_kl
        self.num_logged_samples, self.export_dir = num_logged_samples, export_dir
        self._tokenizer = None
        self.model: nn.Module | None = None
        self._reference_name: str | None = None  # the adapter the reference runs under (None: adapters disabled)
        self._has_reference = False
        self.reward_scorer: RewardScorer | None = None  # the reward model's own scorer (normalised scores)
        self.generator = torch.Generator().manual_seed(
            torch.initial_seed() if sampling_seed is None else sampling_seed)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the base once and put the policy (and, when used, the reference and reward) on it."""
        if self.model is not None:
            return
        model = build_model(dataclasses.replace(self.load_spec(), lora=None, init_adapter=None), self.tokenizer,
                            device_map=self.quantized_device_map())
        model, line = add_policy(model, self.policy_adapter, self.backbone.lora or LoraSettings())
        rank_zero_only(print)(f"grpo: {line}")
        if self.reward_model_dir is not None:  # not a submodule: its model is self.model
            object.__setattr__(self, "reward_scorer", load_reward_model(model, self.reward_model_dir, REWARD))
        # No reference at all (not even its adapter) unless the KL term or the evaluation's KL reads it.
        if self.beta > 0 or (self.eval_kl and (self.reference == "base" or self.policy_adapter is not None)):
            warn_unmerged_reference("grpo", self.reference, self.policy_adapter)
            model, self._reference_name = add_reference(model, self.reference, self.policy_adapter)
            self._has_reference = True
        model.set_adapter(POLICY)
        train_only(model, (POLICY,))
        disable_dropout(model)  # dropout would make rollout and update log-probs disagree
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ forwards
    def _logits(self, query, query_mask, response, response_mask, adapter: str | None = POLICY) -> torch.Tensor:
        """Logits / temperature at each response position, under ``adapter`` (None: adapters disabled)."""
        with active_adapter(self.model, adapter):
            hidden = response_hidden(self.model, query, query_mask, response, response_mask)
        return response_logits(self.model, hidden, self.temperature)

    @torch.no_grad()
    def _logprobs(self, query, query_mask, response, response_mask, adapter: str | None) -> torch.Tensor:
        """Log-probs of the response tokens under ``adapter``, ``forward_batch_size`` rows per pass."""
        parts = []
        for rows in _chunks(torch.arange(len(query), device=query.device), self.forward_batch_size):
            logits = self._logits(query[rows], query_mask[rows], response[rows], response_mask[rows], adapter=adapter)
            parts.append(token_logprobs(logits, response[rows]))
        return torch.cat(parts)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], texts: list[str], query, query_mask, response, response_mask
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward per response (one row per response, ``prompts`` row by row too), and its parts."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(texts), device=query.device)
        if self.reward_scorer is not None:
            ids = torch.cat([query, response], dim=1)
            mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
            parts["reward_model"] = torch.cat([
                self.reward_scorer(ids[rows], mask[rows], position_ids_from_mask(mask[rows]), normalize=True)
                for rows in _chunks(torch.arange(len(ids), device=ids.device), self.forward_batch_size)])
            total = total + self.reward_model_weight * parts["reward_model"]
        for reward in self.rewards:
            value = reward(prompts, texts).to(total.device, torch.float32)
            parts[getattr(reward, "name", type(reward).__name__)] = value
            total = total + value
        return total, parts

    # ------------------------------------------------------------ rollouts
    def _prompts_of(self, batch: dict[str, torch.Tensor]) -> list[Prompt]:
        return [self.trainer.datamodule.train_prompts[int(i)] for i in batch["index"]]

    def _decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip()
                for row, m in zip(response, mask)]

    def _updates_per_iteration(self, rows: int) -> int:
        return math.ceil(rows / (self.minibatch_size or rows))

    @torch.no_grad()
    def rollout(self, query: torch.Tensor, query_mask: torch.Tensor, prompts: list[Prompt]) -> GroupRollout:
        """G samples per prompt (one prefill each), their rewards and group advantages; the old and reference
        log-probs only where they are needed (see the module docstring)."""
        self.model.eval()
        G = self.num_generations
        with active_adapter(self.model, POLICY):
            samples = sample(self.model, query, query_mask, self.max_new_tokens, self.tokenizer.eos_token_id,
                             self.tokenizer.pad_token_id, self.temperature, self.top_p, self.generator,
                             num_samples=G)
        self._generation_s = time.perf_counter() - self._step_start
        query, query_mask = query.repeat_interleave(G, 0), query_mask.repeat_interleave(G, 0)
        response, mask = samples.tokens, samples.mask
        old = None
        if self.num_iterations > 1 or self._updates_per_iteration(len(query)) > 1:
            old = self._logprobs(query, query_mask, response, mask, POLICY)
        ref = self._logprobs(query, query_mask, response, mask, self._reference_name) if self.beta else None
        texts = self._decode(response, mask)
        rows = [p for p in prompts for _ in range(G)]
        rewards, parts = self.score(rows, texts, query, query_mask, response, mask)
        rewards = eos_penalty(rewards, samples.ended_with_eos, self.missing_eos_penalty)
        advantages = group_advantages(rewards, G, self.baseline, self.scale_rewards)
        self.model.train()
        return GroupRollout(query, query_mask, response, mask, old, ref, rewards, parts, advantages,
                            samples.ended_with_eos, texts, prompts, G)

    # -------------------------------------------------------------- updates
    def group_update(self, r: GroupRollout) -> dict[str, float]:
        """``num_iterations`` passes of shuffled minibatch updates; returns token-weighted mean statistics."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        rows = len(r.query)
        size = self.minibatch_size or rows
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(self.num_iterations):
            order = torch.randperm(rows, generator=self.generator).to(r.query.device)
            for minibatch in _chunks(order, size):
                tokens = r.mask[minibatch].sum().clamp(min=1)
                for chunk in _chunks(minibatch, self.forward_batch_size):
                    weight = float(r.mask[chunk].sum() / tokens)  # this chunk's share of the minibatch's tokens
                    for key, value in self._micro_step(r, chunk, len(minibatch), tokens).items():
                        sums[key] = sums.get(key, 0.0) + value * weight
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                updates += 1
        return {key: value / max(1, updates) for key, value in sums.items()}

    def _micro_step(self, r: GroupRollout, rows: torch.Tensor, sequences: int, tokens: torch.Tensor
                    ) -> dict[str, float]:
        """One forward/backward over ``rows``: its part of the minibatch loss (whole-minibatch normalisers)."""
        mask = r.mask[rows]
        logits = self._logits(r.query[rows], r.query_mask[rows], r.response[rows], mask)
        logprobs = token_logprobs(logits, r.response[rows])
        old = logprobs.detach() if r.logprobs is None else r.logprobs[rows]
        ref = None if r.ref_logprobs is None else r.ref_logprobs[rows]
        out = group_policy_loss(logprobs, old, r.advantages[rows], mask, self.clip_range, self.loss_type,
                                self.clip_range_high, ref, self.beta, self.kl_estimator, self.max_new_tokens,
                                num_sequences=sequences, num_tokens=tokens)
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
            self._log_samples(r)

    def _log_samples(self, r: GroupRollout) -> None:
        G = r.group_size
        rows = [[r.prompts[i // G].text[-200:], t, float(s)] for i, (t, s) in enumerate(zip(r.texts, r.rewards))]
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text("samples", columns=["prompt", "response", "reward"],
                                data=rows[: self.num_logged_samples], step=self.global_step)

    # ------------------------------------------------------------ evaluation
    def evaluation_roles(self) -> EvaluationRoles:
        """The held-out evaluation's roles (:mod:`lit_ft.callbacks.evaluation`, the table PPO and DPO print): the
        policy adapter, the reference for the KL at the sampling temperature (when it is loaded: ``beta`` > 0 or
        ``eval_kl``), and the reward model's own normalised scorer (when there is one). The gold win-rate comes
        from the data's gold judge."""
        reference = None
        if self._has_reference:
            name = self._reference_name
            reference = lambda: active_adapter(self.model, name)
        scorer = None if self.reward_scorer is None else functools.partial(self.reward_scorer, normalize=True)
        return EvaluationRoles(self.model, self.tokenizer, policy=lambda: active_adapter(self.model, POLICY),
                               reference=reference, scorer=scorer, temperature=self.temperature,
                               names=("SFT policy", "GRPO policy"), max_new_tokens=self.max_new_tokens)

    def configure_callbacks(self) -> list[L.Callback]:
        """The held-out evaluation with GRPO's settings (``num_eval``, ``eval_batch_size``); it replaces a
        :class:`GenerationTable` of the trainer's."""
        return GenerationTable.for_stage(self.num_eval, self.eval_batch_size, self.max_new_tokens)

    def on_train_start(self) -> None:
        self._check_checkpoint_interval()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.export_dir:
            print(f"lit_ft: saved the GRPO policy to {self.export(self.export_dir)}")

    def _check_checkpoint_interval(self) -> None:
        """Checkpoints must fall on rollout boundaries: every_n_train_steps a multiple of updates per batch."""
        prompts = getattr(self.trainer.datamodule, "micro_batch_size", 1)
        per_batch = self.num_iterations * self._updates_per_iteration(prompts * self.num_generations)
        check_between_rollouts(self.trainer, per_batch, "num_iterations x minibatches")

    # ------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_and_schedule(lora_param_groups(self, self.backbone.lora), self.optimizer_fn,
                                      self.scheduler_fn, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The trainable adapter, plus what makes resume exact: the sampling generator and the RNG states."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo"] = sampling_state(self.generator)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint the config does not continue
        state = checkpoint.get("grpo")
        if state is None:
            return
        restore_sampling_state(self.generator, state)

    def export(self, directory: str) -> Path:
        """``policy/``: the PEFT adapter, the tokenizer and the record of how the base was loaded."""
        out = Path(directory)
        save_adapter(self.model, out / POLICY, POLICY, self.tokenizer, self.base_record())
        return out
