"""KL to the reference: the per-token estimators, the controllers of the KL coefficient beta, and the stages' KL
settings (``model.kl``): in PPO's reward (:class:`KLRewardSettings`) or in GRPO's loss (:class:`KLLossSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ft.errors import ConfigError, check_choice
from lit_ft.rl.advantages import _f

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS: tuple[str, ...] = KLEstimator.__args__


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    ``"k1"``: logp - ref_logp (unbiased, can be negative per token).
    ``"k3"``: (exp(ref - logp) - 1) - (ref - logp) (Schulman's unbiased, always non-negative, lower variance).
    """
    logprobs, ref_logprobs = _f(logprobs), _f(ref_logprobs)
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, beta: float = 0.05) -> None:
        """
        Args:
            beta: KL penalty coefficient. 0.05 is TRL's ``PPOConfig.kl_coef`` default, a common starting point.
        """
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"FixedKLController(beta={self.beta})"

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.beta = float(state_dict["beta"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

    error = clamp(current_kl / target - 1, -0.2, 0.2); beta *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_beta: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        """
        Args:
            init_beta: starting KL coefficient (0.2: the initial value in TRL's original adaptive-KL setup).
            target: KL (nats per sequence) to steer towards; 6.0 is the value used by Ziegler et al.
            horizon: number of samples over which beta adapts; 10000 as in Ziegler et al.
        """
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.init_beta = self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def __repr__(self) -> str:
        """Its settings, not its moving beta: the run record compares settings on resume."""
        return f"AdaptiveKLController(init_beta={self.init_beta}, target={self.target}, horizon={self.horizon})"

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards keeping ``current_kl`` at ``target``; ``n_steps`` = samples seen since last update."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restores beta exactly; target/horizon come from the config and are kept as constructed."""
        self.beta = float(state_dict["beta"])


@dataclass(frozen=True)
class KLRewardSettings:
    """The KL to the reference as a per-token penalty in the reward: PPO's ``model.kl`` (beta x KL per token is
    subtracted from the reward before GAE, as InstructGPT and TRL do).

    Args:
        controller: the coefficient beta, fixed or adaptive (Ziegler et al. 2019). None: ``FixedKLController``
            with beta 0.05, TRL's ``PPOConfig.kl_coef`` default.
        estimator: "k1" (the log-ratio: unbiased, negative at some tokens; TRL's PPO default) or "k3" (never
            negative, lower variance).
    """

    controller: FixedKLController | AdaptiveKLController | None = None
    estimator: KLEstimator = "k1"

    def __post_init__(self) -> None:
        check_choice("model.kl.estimator", self.estimator, KLEstimator)

    def make_controller(self) -> FixedKLController | AdaptiveKLController:
        """The controller the stage updates (the given one, or a fixed beta of 0.05)."""
        return self.controller or FixedKLController(0.05)


@dataclass(frozen=True)
class KLLossSettings:
    """The KL to the reference as a term of the loss: GRPO's ``model.kl`` (beta x the per-token KL, reduced as the
    policy loss is).

    Args:
        beta: its coefficient (0.0: TRL's default since DAPO and Dr. GRPO found it unneeded with verifiable rewards;
            0 makes no reference pass at all; DeepSeekMath's GRPO used 0.04).
        estimator: "k3" (GRPO's: never negative) or "k1".
    """

    beta: float = 0.0
    estimator: KLEstimator = "k3"

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"model.kl.beta must be >= 0, got {self.beta}")
        check_choice("model.kl.estimator", self.estimator, KLEstimator)


# Modules built in Python keep their settings (and a given controller) in their checkpoints' hyper-parameters.
torch.serialization.add_safe_globals([KLRewardSettings, KLLossSettings, FixedKLController, AdaptiveKLController])
