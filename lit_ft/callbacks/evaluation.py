"""Before/after generations: greedy completions of fixed held-out prompts, printed and logged to W&B as a table.

The prompts are the data module's held-out items (:mod:`lit_ft.data.heldout`), rendered as in training. On data
whose answers can be checked exactly (the embedded world), it also measures held-out exact match before training
and after, overall and per task.
"""

from __future__ import annotations

import textwrap

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_ft.data.heldout import HeldOut
from lit_ft.loggers.run_dir import EVALUATION_FILE, evaluation_record, write_json
from lit_ft.metrics import exact_match, per_task_counts
from lit_ft.padding import pad_rows


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of token-id prompts, batched with left padding; returns the decoded new text."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_rows(prompts[start : start + batch_size], tokenizer.pad_token_id, "left")
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


class GenerationTable(L.Callback):
    """Greedy generations of held-out prompts at the start of training and at its end.

    Args:
        num_shown: prompts shown in the printed table and the W&B table.
        num_scored: held-out examples scored by exact match when the data module's answers are checkable.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts generated at once.
        width: characters per generation column in the printed table (the prompt column is 1.5x wider).
    """

    def __init__(
        self,
        num_shown: int = 6,
        num_scored: int = 200,
        max_new_tokens: int = 32,
        batch_size: int = 50,
        width: int = 30,
    ):
        self.num_shown = num_shown
        self.num_scored = num_scored
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.width = width
        self.results: dict[str, dict] = {}

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict:
        """Generate for the data module's held-out prompts (:class:`lit_ft.data.heldout.HeldOut`); score exact match
        when its answers are checkable."""
        dm = trainer.datamodule
        if not isinstance(dm, HeldOut):
            return {}
        checkable = bool(dm.checkable)
        items = dm.heldout()[: max(self.num_shown, self.num_scored if checkable else 0)]
        if not items:
            return {}
        prompts = [item.prompt for item in items]
        texts = greedy_generate(
            pl_module.model, pl_module.tokenizer, [p.input_ids for p in prompts], self.max_new_tokens,
            self.batch_size,
        )
        result: dict = {"rows": [(p, t) for p, t in zip(prompts[: self.num_shown], texts)]}
        if checkable:
            hits = [exact_match(t, item.reference or "") for item, t in zip(items, texts)]
            per_task = per_task_counts(hits, [item.task or "all" for item in items])
            result["exact_match"] = sum(hits) / len(hits)
            result["per_task"] = {task: right / total for task, (right, total) in per_task.items()}
            result["scored"] = len(hits)
        self.results[tag] = result
        return result

    @rank_zero_only
    def _report(self, trainer: L.Trainer, tag: str, result: dict) -> None:
        if "exact_match" in result:
            tasks = ", ".join(f"{k} {v:.0%}" for k, v in result["per_task"].items())
            print(f"held-out exact match ({tag}): {result['exact_match']:.1%} of {result['scored']} [{tasks}]")
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/exact_match_{tag}": result["exact_match"]}, step=trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key=f"generations/{tag}",
                    columns=["prompt", "reference", "generation"],
                    data=[[p.text, p.reference or "", t] for p, t in result["rows"]],
                )

    def print_table(self) -> None:
        """The before/after table: one row per prompt, columns side by side."""
        tags = list(self.results)
        if not tags:
            return
        cols = ["prompt", "reference"] + tags
        widths = [self.width * 3 // 2] + [self.width] * (len(cols) - 1)
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        print(line)
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
        print(line)
        first = self.results[tags[0]]["rows"]
        for i, (prompt, _) in enumerate(first):
            cells = [_tail(prompt.text, widths[0]), (prompt.reference or "")]
            cells += [self.results[t]["rows"][i][1] for t in tags]
            wrapped = [textwrap.wrap(repr(c)[1:-1], w) or [""] for c, w in zip(cells, widths)]
            for k in range(min(3, max(len(x) for x in wrapped))):
                print("| " + " | ".join((x[k] if k < len(x) else "").ljust(w) for x, w in zip(wrapped, widths)) + " |")
            print(line)
        summary = [f"{t}: {self.results[t]['exact_match']:.1%}" for t in tags if "exact_match" in self.results[t]]
        if summary:
            print("held-out exact match  " + "  ->  ".join(summary))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "before", self.evaluate(trainer, pl_module, "before"))

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
