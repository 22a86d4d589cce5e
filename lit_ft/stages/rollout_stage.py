"""What the on-policy RL stages share (PPO, GRPO): rewards from a reward model and programmatic rewards, sampling
with a generator they own and checkpoint, the forward passes over prompt + response, the minibatch updates of
manual optimisation, the sample tables, and the held-out evaluation with their settings.

Each training step is one rollout batch; checkpoints fall between rollout batches only
(:func:`lit_ft.callbacks.checkpointing.check_between_rollouts`), where the state is whole: the prompt position, the
sampling generator and the process RNG states (checkpoint key: the stage's name), and the optimiser.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_ft.backbone import Backbone, active_adapter
from lit_ft.backbone.roles import POLICY
from lit_ft.callbacks.checkpointing import check_between_rollouts
from lit_ft.callbacks.evaluation import EvaluationRoles, GenerationTable
from lit_ft.data.formats import Prompt
from lit_ft.errors import ConfigError
from lit_ft.padding import position_ids_from_mask
from lit_ft.rl.rewards import ProgrammaticReward
from lit_ft.rl.rollout import (
    Samples,
    SamplingSettings,
    response_hidden,
    response_logits,
    restore_sampling_state,
    sample,
    sampling_state,
)
from lit_ft.stages.policy_stage import PolicyStage
from lit_ft.stages.reward_model import RewardScorer, load_reward_model

REWARD = "reward"
# Lightning warns that checkpoints of manual optimisation hold the state after the step; these stages' checkpoints
# are taken between rollout batches (:meth:`RolloutStage.on_train_start`), where that is the state to resume from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@dataclass(frozen=True)
class EvaluationSettings:
    """The held-out evaluation before and after training, and the logged sample tables (``model.evaluation``).

    Args:
        num_prompts: held-out prompts answered greedily before and after training by
            :class:`lit_ft.callbacks.evaluation.GenerationTable` (200: the embedded world's whole held-out set);
            None for all, 0 for none.
        batch_size: prompts per generation batch in that evaluation (64: one batch of the tiny model's held-out
            prompts takes little memory; the 7B recipes set 16).
        num_logged_samples: rollout samples shown in each logged sample table, every 10 rollout batches (8: a
            table that fits a screen).
    """

    num_prompts: int | None = 200
    batch_size: int = 64
    num_logged_samples: int = 8


torch.serialization.add_safe_globals([EvaluationSettings])  # modules built in Python keep it in their checkpoints


class Chunk(NamedTuple):
    """The rows of one forward/backward pass within a minibatch update."""

    rows: torch.Tensor  # the rollout rows of this pass
    weight: float  # its share of the minibatch's response tokens
    sequences: int  # responses in the minibatch
    tokens: torch.Tensor  # response tokens in the minibatch (at least 1)


def chunks(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``indices`` in consecutive pieces of ``size`` (the last may be shorter)."""
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def updates_per_pass(rows: int, minibatch_size: int | None) -> int:
    """Optimizer updates of one pass over ``rows`` rollout rows (None: the whole batch in one update)."""
    return math.ceil(rows / (minibatch_size or rows))


class RolloutStage(PolicyStage):
    """A policy trained on its own samples, scored by rewards (manual optimisation), with exact resume.

    Args (the subclass's, passed on; see :class:`PolicyStage` for the others):
        rewards: programmatic rewards (``class_path``), added to the reward-model score.
        reward_model: a reward-model export (adapter, score head, statistics); None: the programmatic rewards alone.
        reward_model_weight: weight of the normalised reward-model score.
        sampling: :class:`lit_ft.rl.rollout.SamplingSettings`.
        forward_batch_size: responses per forward pass (the stage's update settings hold it).
        evaluation: :class:`EvaluationSettings`.
    """

    def __init__(self, backbone: Backbone | None, policy_adapter: str | None, reference: str,
                 rewards: list[ProgrammaticReward] | None, reward_model: str | None, reward_model_weight: float,
                 optimizer: OptimizerCallable, scheduler: LRSchedulerCallable, sampling: SamplingSettings,
                 forward_batch_size: int, evaluation: EvaluationSettings, export_dir: str | None):
        super().__init__(backbone, policy_adapter, reference, optimizer, scheduler, export_dir)
        self.automatic_optimization = False
        if reward_model is None and not rewards:
            raise ConfigError(f"{self.stage.upper()} needs a reward: set model.reward_model, model.rewards, or both")
        self.rewards = list(rewards or [])
        self.reward_model_dir, self.reward_model_weight = reward_model, reward_model_weight
        self.sampling, self.evaluation = sampling, evaluation
        self.forward_batch_size = forward_batch_size
        self.reward_head: nn.Linear | None = None
        self.reward_scorer: RewardScorer | None = None  # the reward model's own scorer (lit_ft.stages.reward_model)
        self.generator = sampling.generator()

    # ------------------------------------------------------------------ roles
    def _add_reward_model(self, model: nn.Module) -> None:
        """The reward model's adapter and head, frozen, on ``model`` (when one is set)."""
        if self.reward_model_dir is None:
            return
        scorer = load_reward_model(model, self.reward_model_dir, REWARD)
        object.__setattr__(self, "reward_scorer", scorer)  # not a submodule: its model is self.model
        self.reward_head = scorer.head  # a (frozen) submodule: it moves with the module
        rank_zero_only(print)(f"{self.stage}: reward model from {self.reward_model_dir} (normalised with mean "
                              f"{scorer.stats.get('mean', 0.0):.3f}, std {scorer.stats.get('std', 1.0):.3f})")

    # ------------------------------------------------------------ forwards
    def _logits(self, query, query_mask, response, response_mask, adapter: str | None = POLICY) -> torch.Tensor:
        """Logits / temperature at each response position, under ``adapter`` (None: adapters disabled)."""
        with active_adapter(self.model, adapter):
            hidden = response_hidden(self.model, query, query_mask, response, response_mask)
        return response_logits(self.model, hidden, self.sampling.temperature)

    @torch.no_grad()
    def reward_model_scores(self, query, query_mask, response, response_mask) -> torch.Tensor:
        """Normalised reward-model scores of prompt + response, read at the last response token,
        ``forward_batch_size`` rows per pass."""
        ids = torch.cat([query, response], dim=1)
        mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
        return torch.cat([self.reward_scorer(ids[rows], mask[rows], position_ids_from_mask(mask[rows]), normalize=True)
                          for rows in chunks(torch.arange(len(ids), device=ids.device), self.forward_batch_size)])

    @torch.no_grad()
    def score(self, prompts: list[Prompt], texts: list[str], query, query_mask, response, response_mask
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total score per response (one row per response, ``prompts`` row by row too), and its parts (the
        reward model, each programmatic reward)."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(texts), device=query.device)
        if self.reward_scorer is not None:
            parts["reward_model"] = self.reward_model_scores(query, query_mask, response, response_mask)
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

    def _sample(self, query: torch.Tensor, query_mask: torch.Tensor, num_samples: int = 1) -> Samples:
        """``num_samples`` responses per prompt from the policy, with the sampling settings and generator."""
        s = self.sampling
        with active_adapter(self.model, POLICY):
            return sample(self.model, query, query_mask, s.max_new_tokens, self.tokenizer.eos_token_id,
                          self.tokenizer.pad_token_id, s.temperature, s.top_p, self.generator, num_samples=num_samples)

    # -------------------------------------------------------------- updates
    def minibatch_updates(self, mask: torch.Tensor, passes: int, minibatch_size: int, max_grad_norm: float | None,
                          step: Callable[[Chunk], dict[str, float]]) -> dict[str, float]:
        """``passes`` shuffled passes over the rollout's rows (``mask``: their response masks), one optimizer update
        per minibatch of ``minibatch_size`` rows. A minibatch runs in chunks of ``forward_batch_size`` rows whose
        gradients accumulate: ``step(chunk)`` does one chunk's forward and backward and returns its statistics.
        Returns their means over the updates, each chunk weighted by its share of its minibatch's tokens."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(passes):
            order = torch.randperm(len(mask), generator=self.generator).to(mask.device)
            for minibatch in chunks(order, minibatch_size):
                tokens = mask[minibatch].sum().clamp(min=1)
                for rows in chunks(minibatch, self.forward_batch_size):
                    chunk = Chunk(rows, float(mask[rows].sum() / tokens), len(minibatch), tokens)
                    for key, value in step(chunk).items():
                        sums[key] = sums.get(key, 0.0) + value * chunk.weight
                if max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                updates += 1
        return {key: value / max(1, updates) for key, value in sums.items()}

    def _log_sample_table(self, rows: list[list[Any]], score: str) -> None:
        """Prompt, response and ``score`` of the first ``num_logged_samples`` rows, to loggers that take text."""
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text("samples", columns=["prompt", "response", score],
                                data=rows[: self.evaluation.num_logged_samples], step=self.global_step)

    # ------------------------------------------------------------ evaluation
    def evaluation_roles(self) -> EvaluationRoles:
        """The held-out evaluation's roles (:mod:`lit_ft.callbacks.evaluation`): the policy adapter, the reference
        (when it is loaded) for the KL at the sampling temperature, and the reward model's own scorer, normalised
        with its stored statistics (when there is one). The gold win-rate comes from the data's gold judge."""
        scorer = None if self.reward_scorer is None else functools.partial(self.reward_scorer, normalize=True)
        return self._evaluation_roles(("SFT policy", f"{self.stage.upper()} policy"), self.sampling.max_new_tokens,
                                      scorer=scorer, temperature=self.sampling.temperature)

    def configure_callbacks(self) -> list[L.Callback]:
        """The held-out evaluation with the stage's ``evaluation`` settings; it replaces a
        :class:`GenerationTable` of the trainer's. ``num_prompts: 0`` turns it off."""
        e = self.evaluation
        return GenerationTable.for_stage(e.num_prompts, e.batch_size, self.sampling.max_new_tokens)

    def on_train_start(self) -> None:
        """Checkpoints must fall on rollout boundaries: every_n_train_steps a multiple of the updates per batch."""
        check_between_rollouts(self.trainer, self.updates_per_rollout(), self.updates_made_of)

    updates_made_of = "passes x minibatches"  # how the stage names its updates per rollout batch

    def updates_per_rollout(self) -> int:
        """Optimizer updates one rollout batch makes (the stage's passes x minibatches)."""
        raise NotImplementedError

    # ------------------------------------------------------------ checkpoints
    def _rollout_state(self) -> dict[str, Any]:
        """What else the stage checkpoints beside the sampling state (PPO: its KL controller)."""
        return {}

    def _restore_rollout_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`_rollout_state` saved."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The trainable tensors (the contract), plus what makes resume exact: the sampling generator, the RNG
        states and the stage's own rollout state, under the stage's name."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.stage] = {**self._rollout_state(), **sampling_state(self.generator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint the config does not continue
        state = checkpoint.get(self.stage)
        if state is None:
            return
        self._restore_rollout_state(state)
        restore_sampling_state(self.generator, state)
