"""Prompts for PPO: the prompt side of instruction or preference data, left-padded for generation.

The same sources as SFT and the reward model (a local file, a hub dataset id, or the embedded tasks), and the
same rendering: an instruction record gives the prompt SFT trained on (:func:`lit_ft.data.formats.format_prompt`),
a preference record gives the shared prompt of its pair (:func:`lit_ft.data.preference_formats.tokenize_pair`).
Where a record carries an answer (Alpaca ``output``, a chat's last assistant turn, a completion), it becomes the
prompt's ``reference``; programmatic rewards such as exact match read it.

Batches are ``input_ids`` and ``attention_mask`` (left padding: every prompt ends in the last column, where
generation continues) plus ``index``, the position of each prompt in :attr:`PromptDataModule.train_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_ft.data.datamodule import InstructionDataModule, _progress
from lit_ft.data.formats import FORMATS, Prompt, format_prompt
from lit_ft.data.preference_formats import PREFERENCE_FORMATS, pair_parts, resolve_preference_format
from lit_ft.data.sources import DataError, Location
from lit_ft.data.synthetic import TASKS, Fact, instruction_records, split_facts
from lit_ft.padding import pad_rows

PROMPT_FORMATS = tuple(dict.fromkeys(f for f in FORMATS + PREFERENCE_FORMATS if f != "text"))


def record_prompt(record: dict, tokenizer: Any, format: str = "auto", chat_template: str | None = None,
                  location: Location | None = None) -> Prompt:
    """The prompt of an instruction record, or the shared prompt of a preference record (``chosen``/``rejected``)."""
    if "chosen" in record and "rejected" in record:
        fmt = resolve_preference_format(format if format in PREFERENCE_FORMATS else "auto", record, location)
        prompt, _, _, alpaca_input = pair_parts(record, fmt, location)
        if alpaca_input is not None:
            return format_prompt({"instruction": prompt, "input": alpaca_input}, tokenizer, "alpaca", None, location)
        rendered = format_prompt({"messages": prompt}, tokenizer, "chat", chat_template, location)
        return Prompt(rendered.text, rendered.input_ids, None)  # the chosen answer is not a reference
    return format_prompt(record, tokenizer, format if format in FORMATS else "auto", chat_template, location)


def cut_prompt(ids: list[int], max_length: int) -> list[int]:
    """Keep the end of an overlong prompt (the question), and its first token (BOS)."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - (max_length - 1):]


def _task(record: Any) -> str | None:
    task = record.get("task") if isinstance(record, dict) else None
    return str(task) if task is not None else None


def balanced_by_task(facts: list[Fact]) -> list[Fact]:
    """Each task family's facts repeated (whole copies, then a leading part) up to the largest family's count,
    grouped by family in order of first appearance (the sampler shuffles them)."""
    families: dict[str, list[Fact]] = {}
    for fact in facts:
        families.setdefault(fact.task, []).append(fact)
    target = max((len(group) for group in families.values()), default=0)
    out: list[Fact] = []
    for group in families.values():
        out += [group[i % len(group)] for i in range(target)]
    return out


@dataclass
class PromptStats:
    """Counts and lengths of one split, printed once at setup."""

    name: str
    records: int
    prompts: int
    cut: int = 0  # kept, with the prompt cut from the left to max_prompt_length
    with_reference: int = 0
    length_mean: float = 0.0
    length_max: int = 0

    @property
    def examples(self) -> int:
        return self.prompts

    @property
    def dropped(self) -> int:
        return self.records - self.prompts

    def __str__(self) -> str:
        return (f"{self.name}: {self.prompts:,} prompts from {self.records:,} records; tokens mean "
                f"{self.length_mean:.1f}, max {self.length_max:,}; cut from the left {self.cut:,}; "
                f"{self.with_reference:,} with a reference answer")


class PromptDataset(Dataset):
    """Prompts as token-id tensors, with their index (the module looks records and references up by it)."""

    def __init__(self, prompts: list[Prompt], tasks: list[str | None] | None = None):
        self.prompts = prompts
        self.tasks = tasks or [None] * len(prompts)  # each prompt's task family (embedded data), for per-task metrics
        self.ids = [torch.tensor(p.input_ids, dtype=torch.long) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "index": index}


@dataclass
class LeftPadCollator:
    """Left-pads prompts to one width: ``input_ids``, ``attention_mask`` (B, L) and ``index`` (B,)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([item["input_ids"] for item in items], self.pad_token_id, "left")
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index}


class PromptDataModule(InstructionDataModule):
    """Prompts for PPO from instruction or preference data; the embedded SFT tasks when ``source`` is None.

    The training prompts are shuffled per epoch with a seeded generator and resume exactly from a checkpoint.
    The held-out prompts (``eval_prompts``) are what the PPO module scores before and after training.

    Args:
        source: local file (.json, .jsonl, .json.gz, .parquet), datasets-loadable directory or hub id; instruction
            records (Alpaca, chat, prompt/completion) or preference records (prompt/chosen/rejected, HH). None
            uses the embedded tasks, whose answers are exactly checkable.
        format: auto (per record) or one of alpaca, chat, prompt_completion, prompt, hh.
        split: split of a hub dataset or directory.
        val_source: separate held-out prompts; when None, ``val_split_fraction`` of ``source`` is held out.
        val_split: split of ``val_source`` (default: ``split``).
        val_split_fraction: fraction of ``source`` held out when there is no ``val_source``.
        max_prompt_length: longer prompts lose tokens from the left, BOS kept (256: the embedded prompts are ~40).
        micro_batch_size: prompts per rollout batch on each device.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and of the per-epoch shuffle.
        max_examples: use only the first this many training records.
        chat_template: Jinja chat template overriding the tokenizer's; "builtin" forces ``[INST] ... [/INST]``.
        subset: configuration name of a hub dataset.
        num_train: embedded SFT-train facts (2000: must match the SFT stage).
        num_heldout: embedded held-out facts (200: must match the SFT stage; never trained on).
        world_seed: seed of the embedded world (1234: must match the SFT stage and the base).
        tasks: embedded task families the training prompts come from (None: all); the held-out prompts keep
            every family, so exact match stays comparable with the SFT stage's. Embedded tasks only.
        balance_tasks: repeat each embedded family's training prompts up to the largest family's count, so each
            family is equally likely in a rollout batch (add and successor have under 100 distinct questions,
            the other families ~450). Embedded tasks only.
        tokenizer: tokenizer to use; None takes the LightningModule's.
    """

    def __init__(
        self,
        source: str | None = None,
        format: str = "auto",
        split: str = "train",
        val_source: str | None = None,
        val_split: str | None = None,
        val_split_fraction: float = 0.05,
        max_prompt_length: int = 256,
        micro_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        max_examples: int | None = None,
        chat_template: str | None = None,
        subset: str | None = None,
        num_train: int = 2000,
        num_heldout: int = 200,
        world_seed: int = 1234,
        tasks: list[str] | None = None,
        balance_tasks: bool = False,
        tokenizer: Any = None,
    ):
        super().__init__(source=source, format="auto", split=split, val_source=val_source,
                         val_split_fraction=val_split_fraction, max_seq_length=max_prompt_length, packing=False,
                         micro_batch_size=micro_batch_size, num_workers=num_workers, seed=seed,
                         max_examples=max_examples, chat_template=chat_template, subset=subset,
                         val_split=val_split, tokenizer=tokenizer)
        if format != "auto" and format not in PROMPT_FORMATS:
            raise DataError(f"unknown prompt format '{format}' (expected auto, {', '.join(PROMPT_FORMATS)})")
        if max_prompt_length < 2:
            raise DataError(f"max_prompt_length must be at least 2, got {max_prompt_length}")
        self.format = format
        self.max_prompt_length = max_prompt_length
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.world_seed = world_seed
        unknown = sorted(set(tasks or ()) - set(TASKS))
        if unknown:
            raise DataError(f"unknown embedded task(s) {', '.join(unknown)} (expected some of {', '.join(TASKS)})")
        self.tasks = list(tasks) if tasks else None
        self.balance_tasks = balance_tasks
        if source is not None and (self.tasks or balance_tasks):
            raise DataError("tasks and balance_tasks choose families of the embedded tasks; set them to null and "
                            f"false with source={source!r}")

    @property
    def checkable_answers(self) -> bool:
        """True for the embedded tasks: every prompt has one exactly checkable answer."""
        return self.source is None

    @property
    def train_prompts(self) -> list[Prompt]:
        return self.train_dataset.prompts if self.train_dataset is not None else []

    @property
    def eval_prompts(self) -> list[Prompt]:
        return self.val_dataset.prompts if self.val_dataset is not None else []

    @property
    def eval_tasks(self) -> list[str | None]:
        """The task family of each held-out prompt (None where the records name none)."""
        return self.val_dataset.tasks if self.val_dataset is not None else []

    def embedded_records(self) -> tuple[list[dict], list[dict]]:
        train, heldout = split_facts(self.world_seed, self.num_train, self.num_heldout)
        if self.tasks is not None:
            train = [f for f in train if f.task in self.tasks]
        if self.balance_tasks:
            train = balanced_by_task(train)
        return instruction_records(train), instruction_records(heldout)

    def _resolve_format(self, records: list[dict], locations: list[Location]) -> str:
        return self.format  # resolved per record: instruction and preference records may mix

    def _nothing_usable(self, stats: PromptStats, records: int) -> str:
        return f"no usable prompts in {records} records"

    def _build(self, name: str, records: list[dict], locations: list[Location], fmt: str,
               tokenizer: Any) -> tuple[PromptDataset, PromptStats]:
        prompts: list[Prompt] = []
        cut = 0
        for record, location in _progress(records, locations, name):
            prompt = record_prompt(record, tokenizer, fmt, self.chat_template, location)
            ids = cut_prompt(prompt.input_ids, self.max_prompt_length)
            cut += len(ids) < len(prompt.input_ids)
            prompts.append(Prompt(prompt.text, ids, prompt.reference))
        lengths = [len(p.input_ids) for p in prompts]
        stats = PromptStats(name, len(records), len(prompts), cut=cut,
                            with_reference=sum(p.reference is not None for p in prompts),
                            length_mean=sum(lengths) / max(1, len(lengths)), length_max=max(lengths, default=0))
        return PromptDataset(prompts, [_task(record) for record in records]), stats

    def _collator(self) -> LeftPadCollator:
        return LeftPadCollator(self.pad_token_id())

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "format": self.format, "max_prompt_length": self.max_prompt_length}
