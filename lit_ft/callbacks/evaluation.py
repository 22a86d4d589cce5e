"""The held-out evaluation of every stage: greedy answers to held-out prompts before training and after, scored.

One callback, :class:`GenerationTable`, serves every stage that generates (pre-training, SFT, PPO, and the DPO and
GRPO stages). At the start of training and at its end it generates greedy answers to the data module's held-out
prompts (:class:`lit_ft.data.heldout.HeldOut`, rendered as in training) and measures, overall and per task family:

- **gold win-rate**, when the data has a hidden gold judge (the embedded world, :mod:`lit_ft.data.gold`): the share
  of answers the judge ranks top (correct *and* in the preferred style), so it never exceeds exact match; with it
  the mean gold score and the preferred share (win-rate / exact match: the right answers in the preferred style);
- **exact match**, when every held-out answer is checkable;
- **mean reward-model score**, when the stage has a reward model (its own scorer, normalised);
- **KL to the reference**, mean and max over prompts, when the stage has a reference policy: the exact KL of the
  two next-token distributions (temperature-scaled), summed along each greedy answer, in nats.

It prints one line per evaluation and, at the end, the before/after table and a few generations side by side; logs
``eval/<figure>_<before|after>`` to every logger; and writes ``evaluation.json`` to the run folder
(:func:`lit_ft.loggers.run_dir.evaluation_record`), which the run report reads.

The interface a stage exposes
-----------------------------
A LightningModule lends the evaluation its roles with one method::

    def evaluation_roles(self) -> EvaluationRoles | None: ...

returning an :class:`EvaluationRoles`: the model and tokenizer, a context manager that makes the evaluated policy
active (e.g. ``lambda: active_adapter(self.model, "policy")``), optionally one for the reference policy, a scorer
``(input_ids, attention_mask) -> (rows,)`` (PPO gives its reward model's :class:`RewardScorer
<lit_ft.stages.reward_model.RewardScorer>`, normalised), the temperature the KL is taken at, the column names and
a generation budget. None means "nothing to generate" (the reward model stage). A module without the method is
evaluated as ``EvaluationRoles(pl_module.model, pl_module.tokenizer)``: its model as it is, no reference, no
scorer (pre-training, SFT). PPO, DPO and GRPO implement it; they may also return the callback from
``configure_callbacks`` with their own settings (PPO and GRPO do, from their ``evaluation`` group; DPO from
``num_eval`` and ``eval_batch_size``).

A data module offers a gold judge with a ``gold_judge`` attribute on its record source (``data.source``): an
object with ``rank(prompt_text, response) -> int`` and ``top`` (the best rank), as
:class:`lit_ft.data.gold.GoldJudge`.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_ft.data.formats import Prompt
from lit_ft.data.heldout import HeldOut, HeldOutItem
from lit_ft.loggers.run_dir import EVALUATION_FILE, evaluation_record, write_json
from lit_ft.metrics import exact_match, per_task_counts
from lit_ft.padding import pad_rows
from lit_ft.rl.rollout import response_hidden, response_logits, sample

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvaluationRoles:
    """What a stage lends the held-out evaluation (see the module docstring).

    Attributes:
        model: the causal LM (a PEFT model holding the stage's adapters, or a plain model).
        tokenizer: its tokenizer (pad and EOS ids, decoding).
        policy: makes the evaluated policy active for the duration of a ``with`` block (default: the model as is).
        reference: makes the reference policy active (None: no reference, no KL).
        scorer: ``(input_ids, attention_mask) -> (rows,)`` scores of prompt + answer (None: no reward model).
        temperature: the KL is taken between the temperature-scaled distributions (PPO's sampling temperature: the
            policy its KL penalty constrains).
        names: column names of the before/after table.
        max_new_tokens: generation budget overriding the callback's (None: the callback's).
    """

    model: nn.Module
    tokenizer: Any
    policy: Callable[[], AbstractContextManager] = contextlib.nullcontext
    reference: Callable[[], AbstractContextManager] | None = None
    scorer: Scorer | None = None
    temperature: float = 1.0
    names: tuple[str, str] = ("before", "after")
    max_new_tokens: int | None = None


def stage_roles(pl_module: L.LightningModule) -> EvaluationRoles | None:
    """The stage's :class:`EvaluationRoles` (its ``evaluation_roles()``, else its model as it is)."""
    if hasattr(pl_module, "evaluation_roles"):
        return pl_module.evaluation_roles()
    return EvaluationRoles(pl_module.model, pl_module.tokenizer)


def gold_judge_of(datamodule: Any) -> Any:
    """The data's hidden gold judge (``datamodule.source.gold_judge``), None when it has none."""
    return getattr(getattr(datamodule, "source", None), "gold_judge", None)


# ------------------------------------------------------------------------------------------------ maths
def sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t KL(p_t || q_t) over the masked positions of each row: the exact KL of the full next-token
    distributions (logits (B, T, V), mask (B, T)), in nats per response."""
    logp = policy_logits.float().log_softmax(-1)
    logq = reference_logits.float().log_softmax(-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask.float()).sum(-1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class HeldoutResult:
    """Per-prompt results of one evaluation; any list may be empty when that measure was not taken."""

    texts: list[str]
    tasks: list[str | None]
    right: list[bool] = field(default_factory=list)  # exact match, where answers are checkable
    gold: list[float] = field(default_factory=list)  # the gold judge's rank
    gold_top: float | None = None  # the judge's best rank (its win)
    reward_model: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def _figures(self, rows: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.right:
            out["exact_match"] = _mean([float(self.right[i]) for i in rows])
        if self.gold:
            out["gold_score"] = _mean([self.gold[i] for i in rows])
            if self.gold_top is not None:
                out["gold_win_rate"] = _mean([float(self.gold[i] >= self.gold_top) for i in rows])
                if out.get("exact_match"):
                    out["preferred_share"] = out["gold_win_rate"] / out["exact_match"]
        if self.reward_model:
            out["reward_model_score"] = _mean([self.reward_model[i] for i in rows])
        if self.kl:
            out["kl_mean"] = _mean([self.kl[i] for i in rows])
            out["kl_max"] = max(self.kl[i] for i in rows)
        return out

    def summary(self) -> dict[str, float]:
        """Overall figures, then ``<figure>/<family>`` for each task family."""
        out = self._figures(list(range(len(self.texts))))
        for task in per_task_counts([True] * len(self.tasks), self.tasks):
            for key, value in self._figures([i for i, t in enumerate(self.tasks) if t == task]).items():
                out[f"{key}/{task}"] = value
        return out

    def counts(self) -> str:
        """``family right/total`` per family, e.g. ``add 3/11, count 61/61``."""
        by_task = per_task_counts(self.right, self.tasks[: len(self.right)])
        return ", ".join(f"{task} {right}/{total}" for task, (right, total) in by_task.items())


_ROWS = (  # (key, label, format)
    ("gold_win_rate", "gold win-rate", "{:.1%}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("preferred_share", "preferred share of right answers", "{:.1%}"),
    ("gold_score", "mean gold score", "{:.3f}"),
    ("reward_model_score", "mean reward-model score", "{:+.3f}"),
    ("kl_mean", "KL to the reference, mean (nats)", "{:.3f}"),
    ("kl_max", "KL to the reference, max (nats)", "{:.3f}"),
)
_PER_FAMILY = ("gold_win_rate", "exact_match", "reward_model_score", "kl_mean")


def _cell(figures: dict[str, float], key: str, fmt: str) -> str:
    return fmt.format(figures[key]) if key in figures else "-"


def before_after_table(before: dict[str, float], after: dict[str, float], prompts: int,
                       names: tuple[str, str] = ("before", "after")) -> str:
    """The before/after table of two :meth:`HeldoutResult.summary` dicts: the overall figures, then gold win-rate,
    exact match, reward-model score and mean KL per task family."""
    label_width = 34
    lines = [f"{f'held-out, {prompts} prompts, greedy':<{label_width}} | {names[0]:>12} | {names[1]:>12}"]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in _ROWS:
        if key in before or key in after:
            lines.append(f"{label:<{label_width}} | {_cell(before, key, fmt):>12} | {_cell(after, key, fmt):>12}")
    families = sorted({key.split("/", 1)[1] for key in (*before, *after) if "/" in key})
    for task in families:
        for key, label, fmt in _ROWS:
            if key in _PER_FAMILY and (f"{key}/{task}" in before or f"{key}/{task}" in after):
                name = f"  {task}: {label.split(',')[0]}"
                lines.append(f"{name:<{label_width}} | {_cell(before, f'{key}/{task}', fmt):>12} | "
                             f"{_cell(after, f'{key}/{task}', fmt):>12}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- generation
def _decode(tokenizer: Any, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip() for row, m in zip(tokens, mask)]


@torch.no_grad()
def generate_and_measure(roles: EvaluationRoles, prompts: list[list[int]], max_new_tokens: int,
                         batch_size: int = 32) -> tuple[list[str], list[float], list[float]]:
    """Greedy answers of the policy to token-id prompts (batched, left-padded), with the KL of the policy to the
    reference along each answer (when there is a reference) and the scorer's score (when there is a scorer):
    ``(texts, kl, scores)``, the last two empty when not measured."""
    model, tokenizer = roles.model, roles.tokenizer
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    kl: list[float] = []
    scores: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            query, query_mask = pad_rows(prompts[start:start + batch_size], pad, "left")
            query, query_mask = query.to(device), query_mask.to(device)
            with roles.policy():
                out = sample(model, query, query_mask, max_new_tokens, tokenizer.eos_token_id, pad, greedy=True)
            texts += _decode(tokenizer, out.tokens, out.mask)
            if roles.reference is not None:
                with roles.policy():
                    policy = response_logits(model, response_hidden(model, query, query_mask, out.tokens, out.mask),
                                             roles.temperature)
                with roles.reference():
                    reference = response_logits(model, response_hidden(model, query, query_mask, out.tokens,
                                                                       out.mask), roles.temperature)
                kl += sequence_kl(policy, reference, out.mask).tolist()
            if roles.scorer is not None:
                ids = torch.cat([query, out.tokens], dim=1)
                mask = torch.cat([query_mask.long(), out.mask.long()], dim=1)
                scores += roles.scorer(ids, mask).float().tolist()
    finally:
        model.train(was_training)
    return texts, kl, scores


# --------------------------------------------------------------------------------------------- callback
class GenerationTable(L.Callback):
    """Greedy answers to held-out prompts at the start of training and at its end, scored (module docstring).

    Args:
        num_shown: prompts shown in the printed table and the W&B table.
        num_scored: held-out prompts scored (exact match, gold, reward model, KL) when the answers are checkable or
            the data has a gold judge, or when the stage has a scorer or a reference (200: the embedded held-out
            set, +-3.5 points of sampling error at 50%).
        max_new_tokens: generation budget per prompt (a stage's ``EvaluationRoles.max_new_tokens`` wins).
        batch_size: prompts generated at once.
        width: characters per generation column in the printed table (the prompt column is 1.5x wider).
    """

    def __init__(self, num_shown: int = 6, num_scored: int = 200, max_new_tokens: int = 32, batch_size: int = 50,
                 width: int = 30):
        self.num_shown = num_shown
        self.num_scored = num_scored
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.width = width
        self.results: dict[str, dict] = {}
        self.names: tuple[str, str] = ("before", "after")

    @classmethod
    def for_stage(cls, num_eval: int | None, batch_size: int, max_new_tokens: int) -> list[GenerationTable]:
        """The evaluation a stage returns from ``configure_callbacks`` with its own settings (PPO, DPO, GRPO:
        the number of prompts, the batch size, ``max_new_tokens``); it replaces a GenerationTable of the trainer's.
        ``num_eval`` None scores every held-out prompt; 0 turns the evaluation off."""
        if num_eval == 0:
            return []
        scored = num_eval if num_eval is not None else 10**9
        return [cls(num_shown=min(6, scored), num_scored=scored, batch_size=batch_size, max_new_tokens=max_new_tokens)]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict:
        """Generate for the data module's held-out prompts and measure what the data and the stage allow."""
        dm = trainer.datamodule
        if not isinstance(dm, HeldOut):
            return {}
        roles = stage_roles(pl_module)
        if roles is None:
            return {}
        self.names = roles.names
        judge = gold_judge_of(dm)
        checkable = bool(dm.checkable)
        scored = checkable or judge is not None or roles.scorer is not None or roles.reference is not None
        items: list[HeldOutItem] = dm.heldout()[: max(self.num_shown, self.num_scored if scored else 0)]
        if not items:
            return {}
        prompts = [item.prompt for item in items]
        texts, kl, scores = generate_and_measure(roles, [p.input_ids for p in prompts],
                                                 roles.max_new_tokens or self.max_new_tokens, self.batch_size)
        heldout = HeldoutResult(texts=texts, tasks=[item.task for item in items], reward_model=scores, kl=kl)
        if checkable:
            heldout.right = [exact_match(t, item.reference or "") for item, t in zip(items, texts)]
        if judge is not None:
            heldout.gold = [float(judge.rank(p.text, t)) for p, t in zip(prompts, texts)]
            heldout.gold_top = float(judge.top)
        result: dict = {"rows": list(zip(prompts[: self.num_shown], texts)), "texts": texts,
                        "figures": heldout.summary() if scored else {}, "scored": len(items) if scored else 0,
                        "counts": heldout.counts() if checkable else ""}
        if checkable:
            per_task = per_task_counts(heldout.right, [item.task or "all" for item in items])
            result["exact_match"] = sum(heldout.right) / len(heldout.right)
            result["per_task"] = {task: right / total for task, (right, total) in per_task.items()}
        self.results[tag] = result
        return result

    @rank_zero_only
    def _report(self, trainer: L.Trainer, tag: str, result: dict) -> None:
        if not result:  # nothing was evaluated (no held-out prompts, or a stage that does not generate)
            return
        figures = result.get("figures") or {}
        parts = []
        if "gold_win_rate" in figures:
            parts.append(f"gold win-rate {figures['gold_win_rate']:.1%}")
        if "exact_match" in result:
            detail = result.get("counts") or ", ".join(f"{k} {v:.0%}" for k, v in result["per_task"].items())
            parts.append(f"exact match {result['exact_match']:.1%}" + (f" ({detail})" if detail else ""))
        if "reward_model_score" in figures:
            parts.append(f"mean reward-model score {figures['reward_model_score']:+.3f}")
        if "kl_mean" in figures:
            parts.append(f"KL to the reference {figures['kl_mean']:.3f} nats (max {figures['kl_max']:.3f})")
        if parts:
            name = self.names[0 if tag == "before" else 1] if tag in ("before", "after") else tag
            print(f"held-out {tag} training, {name} ({result['scored']} prompts, greedy): {', '.join(parts)}")
        for logger in trainer.loggers:
            if figures:
                logger.log_metrics({f"eval/{k}_{tag}": v for k, v in figures.items()}, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"generations/{tag}", columns=["prompt", "reference", "generation"],
                                 data=[[p.text, p.reference or "", t] for p, t in result["rows"]])

    def print_table(self) -> None:
        """The generations, one row per prompt, columns side by side; then the before/after figures."""
        tags = list(self.results)
        if not tags:
            return
        cols = ["prompt", "reference"] + tags
        widths = [self.width * 3 // 2] + [self.width] * (len(cols) - 1)
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        print(line)
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
        print(line)
        for i, (prompt, _) in enumerate(self.results[tags[0]]["rows"]):
            cells = [_tail(prompt.text, widths[0]), (prompt.reference or "")]
            cells += [self.results[t]["rows"][i][1] if i < len(self.results[t]["rows"]) else "" for t in tags]
            wrapped = [textwrap.wrap(repr(c)[1:-1], w) or [""] for c, w in zip(cells, widths)]
            for k in range(min(3, max(len(x) for x in wrapped))):
                print("| " + " | ".join((x[k] if k < len(x) else "").ljust(w) for x, w in zip(wrapped, widths)) + " |")
            print(line)
        before, after = (self.results.get(t, {}).get("figures") or {} for t in ("before", "after"))
        if before and after:
            print(before_after_table(before, after, self.results["after"]["scored"], self.names))
        if any("exact_match" in self.results[t] for t in tags):
            print("held-out exact match  " + "  ->  ".join(f"{t}: {self.results[t]['exact_match']:.1%}" for t in tags
                                                          if "exact_match" in self.results[t]))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "before" in self.results:  # restored from the checkpoint of a resumed run: the policy has moved since
            print("held-out before training: as measured at the start of the run (restored from the checkpoint)")
            return
        self._report(trainer, "before", self.evaluate(trainer, pl_module, "before"))

    def state_dict(self) -> dict:
        """The "before" evaluation, in plain types, so that a resumed run's table compares the policy with the
        one it started from, not with the resumed one."""
        if "before" not in self.results:
            return {}
        before = dict(self.results["before"])
        before["rows"] = [[p.text, p.reference, t] for p, t in before["rows"]]
        return {"before": before, "names": list(self.names)}

    def load_state_dict(self, state_dict: dict) -> None:
        if "before" in state_dict:
            before = dict(state_dict["before"])
            before["rows"] = [(Prompt(text, [], reference), t) for text, reference, t in before["rows"]]
            self.results["before"] = before
            self.names = tuple(state_dict.get("names", self.names))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "after", self.evaluate(trainer, pl_module, "after"))
        if trainer.is_global_zero:
            self.print_table()
            write_json(trainer, EVALUATION_FILE, evaluation_record(self.results))  # for the run's report.html


def _tail(text: str, width: int) -> str:
    """The end of a long prompt (the instruction), which is the informative part of a template."""
    text = text.strip()
    marker = "### Instruction:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.replace("### Response:", "").strip()[: 3 * width]
