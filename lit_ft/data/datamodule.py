"""LightningDataModules for instruction tuning (SFT) and raw-text pre-training."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_ft.data.formats import FORMATS, IGNORE_INDEX, resolve_format, tokenize_record
from lit_ft.data.packing import (
    DataStats,
    ExampleStore,
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    PaddedDataset,
    handle_overlong,
    pack,
    packed_stats,
    padded_stats,
)
from lit_ft.data.sources import DataError, Location, load_records_with_locations

log = logging.getLogger("lit_ft")

PROGRESS_BAR_MIN_RECORDS = 10_000  # below this, tokenizing takes a second or two: no bar needed
PAD_TO_MULTIPLE_OF = 8  # tensor-core friendly batch widths
OVERLONG_CHOICES = ("truncate", "drop", "error")  # error: fail on the first overlong example, naming it


class SeededShuffleSampler(DistributedSampler):
    """Shuffles ``range(n)`` with a torch Generator seeded by ``seed + epoch``, splits it across DDP ranks, and
    resumes mid-epoch.

    Lightning calls :meth:`set_epoch` each epoch, so the order of every epoch is a pure function of the seed and
    the epoch number. The data module counts the batches the training loop actually consumed (not the ones the
    loader prefetched) in ``consumed_batches``; a checkpoint stores it, and after a restore the first epoch
    skips exactly those items: nothing is seen twice, nothing is skipped.

    Across ``num_replicas`` ranks, rank r takes items r, r + R, r + 2R... of the epoch's order, so that R ranks
    with micro-batch b see, step for step, exactly the items one process with micro-batch R x b sees. At the end
    of an epoch the order is padded with its own first items to a multiple of R, as ``DistributedSampler`` does.
    It subclasses ``DistributedSampler`` only so that Lightning keeps it instead of wrapping it in another one.
    """

    def __init__(self, num_items: int, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ is not called: it needs a process group, and the split is done here.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_items = num_items
        self.seed = seed
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle, self.drop_last = True, False  # read by Lightning's shuffling checks
        self.num_samples = math.ceil(num_items / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.consumed_batches = 0
        self._skip_items = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed_batches = 0
            self._skip_items = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        start, self._skip_items = self._skip_items, 0
        rest = order[start:]
        if self.num_replicas > 1 and rest:
            rest += (rest * self.num_replicas)[: -len(rest) % self.num_replicas]  # every rank gets as many items
        return iter(rest[self.rank :: self.num_replicas])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_batches": self.consumed_batches, "seed": self.seed,
                "items_per_batch": self.batch_size * self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed_batches = int(state["consumed_batches"])
        per_batch = int(state.get("items_per_batch", self.batch_size * self.num_replicas))
        self._skip_items = min(self.num_items, self.consumed_batches * per_batch)
        if per_batch != self.batch_size * self.num_replicas:  # another world size: count in items, not batches
            self.consumed_batches = self._skip_items // (self.batch_size * self.num_replicas)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is part of the checkpoint (Lightning saves any loader with ``state_dict``)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class InstructionDataModule(L.LightningDataModule):
    """Loads, tokenizes, and packs (or pads) instruction data for supervised fine-tuning."""

    resolve_record_format = staticmethod(resolve_format)  # subclasses with other record formats replace it

    def __init__(
        self,
        source: str | None = None,
        format: str = "auto",
        split: str = "train",
        val_source: str | None = None,
        val_split_fraction: float = 0.05,
        max_seq_length: int = 512,
        packing: bool = True,
        overlong: str = "truncate",
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        max_examples: int | None = None,
        chat_template: str | None = None,
        subset: str | None = None,
        val_split: str | None = None,
        skip_empty_responses: bool = True,
        tokenizer: Any = None,
    ):
        """
        Args:
            source: Local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory,
                or hub dataset id such as ``tatsu-lab/alpaca``. None uses the module's embedded data.
            format: auto (detect from the keys), alpaca, chat, prompt_completion or text.
            split: Split of a hub dataset or directory to train on (ignored for single files).
            val_source: Separate validation data; when None, ``val_split_fraction`` of ``source`` is held out.
            val_split_fraction: Fraction of the training records held out for validation (0 disables).
            max_seq_length: Longest sequence (packed row or single example) in tokens.
            packing: Pack several examples per row (position ids restart per example) instead of padding.
            overlong: What to do with examples longer than max_seq_length: truncate, drop, or error (stop
                before training at the first one, naming its file and line).
            micro_batch_size: Rows per batch on each device.
            num_workers: DataLoader worker processes (0 loads in the main process).
            seed: Seed for the validation split and the per-epoch shuffle.
            max_examples: Use only the first this many records of ``source`` (before the validation split).
            chat_template: Jinja chat template overriding the tokenizer's; "builtin" forces the built-in
                Mistral-instruct template.
            subset: Configuration name of a hub dataset.
            val_split: Split of ``val_source`` to use (default: ``split``).
            skip_empty_responses: Skip records whose response is empty, counting them (real Alpaca has 2 in
                5000); False fails on the first one, naming its file, line and field.
            tokenizer: Tokenizer to use; None takes the attached LightningModule's ``tokenizer``.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if format != "auto" and format not in FORMATS:
            raise DataError(f"unknown format '{format}' (expected auto, {', '.join(FORMATS)})")
        if overlong not in OVERLONG_CHOICES:
            raise DataError(f"overlong must be one of {', '.join(OVERLONG_CHOICES)}, got '{overlong}'")
        if not 0.0 <= val_split_fraction < 1.0:
            raise DataError(f"val_split_fraction must be in [0, 1), got {val_split_fraction}")
        if max_seq_length < 2 or micro_batch_size < 1:
            raise DataError("max_seq_length must be >= 2 and micro_batch_size >= 1")
        self.source = source
        self.format = format
        self.split = split
        self.val_source = val_source
        self.val_split_fraction = val_split_fraction
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.overlong = overlong
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_examples = max_examples
        self.chat_template = chat_template
        self.subset = subset
        self.val_split = val_split
        self.skip_empty_responses = skip_empty_responses
        self.tokenizer = tokenizer
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.stats_train: DataStats | None = None
        self.stats_val: DataStats | None = None
        self.eval_records: list[dict] = []
        self.train_format: str | None = None
        self.val_format: str | None = None

    def embedded_records(self) -> tuple[list[dict], list[dict]]:
        """(train, held-out) records used when ``source`` is None; subclasses with built-in data override."""
        raise DataError("no data source given: set data.source to a file or hub dataset id")

    def resolve_tokenizer(self) -> Any:
        """The tokenizer given at construction, else the attached LightningModule's."""
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: pass tokenizer= or attach a LightningModule with a .tokenizer")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize and pack both splits once; later calls (validate after fit) are no-ops."""
        if self.train_dataset is not None:
            return
        tokenizer = self.resolve_tokenizer()
        train, train_loc, val, val_loc = self._load_splits()
        self.eval_records = list(val)
        self.train_format = self._resolve_format(train, train_loc)
        self.train_dataset, self.stats_train = self._build("train", train, train_loc, self.train_format, tokenizer)
        if self.stats_train.examples == 0:
            raise DataError(self._nothing_usable(self.stats_train, len(train)), self.source or "<embedded data>")
        self.val_format = self._resolve_format(val, val_loc)  # a separate val source may use another format
        self.val_dataset, self.stats_val = self._build("val", val, val_loc, self.val_format, tokenizer)
        for stats in (self.stats_train, self.stats_val):
            log.info("data %s", stats)
            if rank_zero_only.rank == 0:
                print(f"[data] {stats}")

    def _load_splits(self) -> tuple[list[dict], list[Location], list[dict], list[Location]]:
        """Train and held-out records with locations: embedded, a separate val source, or a random split."""
        if self.source is None:
            train, val = self.embedded_records()
            train = train[: self.max_examples] if self.max_examples is not None else train
            return (train, [Location("<embedded train>", row=i) for i in range(len(train))],
                    val, [Location("<embedded val>", row=i) for i in range(len(val))])
        records, locations = load_records_with_locations(self.source, self.split, self.subset)
        if self.max_examples is not None:
            records, locations = records[: self.max_examples], locations[: self.max_examples]
        if not records:
            raise DataError("no records", self.source)
        if self.val_source is not None:
            val, val_loc = load_records_with_locations(self.val_source, self.val_split or self.split, self.subset)
            return records, locations, val, val_loc
        n_val = round(len(records) * self.val_split_fraction)
        if self.val_split_fraction > 0 and len(records) > 1:
            n_val = min(max(n_val, 1), len(records) - 1)  # at least one on each side
        held_out = set(random.Random(self.seed).sample(range(len(records)), n_val))
        train = [i for i in range(len(records)) if i not in held_out]
        val = sorted(held_out)
        return ([records[i] for i in train], [locations[i] for i in train],
                [records[i] for i in val], [locations[i] for i in val])

    def _nothing_usable(self, stats: Any, records: int) -> str:
        """The message when no training example survives tokenization."""
        return (f"no usable training examples ({stats.dropped} of {records} dropped with overlong={self.overlong}, "
                f"max_seq_length={self.max_seq_length})")

    def _resolve_format(self, records: list[dict], locations: list[Location]) -> str:
        """The explicit format, or the one detected from the first record (then required of all)."""
        if self.format != "auto" or not records:
            return self.format  # an empty split tokenizes nothing, so "auto" can stay unresolved
        return self.resolve_record_format("auto", records[0], locations[0])

    def _build(self, name: str, records: list[dict], locations: list[Location], fmt: str,
               tokenizer: Any) -> tuple[Dataset, DataStats]:
        """Tokenize, apply the overlong policy, then pack or pad one split."""
        examples, examples_at, empty = [], [], []
        for record, location in _progress(records, locations, name):
            try:
                examples.append(tokenize_record(record, tokenizer, fmt, self.chat_template, location))
                examples_at.append(location)
            except DataError as err:
                if not (self.skip_empty_responses and err.problem == "empty response"):
                    raise
                empty.append(err)
        if empty:
            log.warning("%s: skipped %d records with an empty response, first: %s", name, len(empty), empty[0])
            if rank_zero_only.rank == 0:
                print(f"[data] {name}: skipped {len(empty)} records with an empty response (first: {empty[0]})")
        overlong = self.overlong
        if overlong == "error":
            _fail_on_overlong(examples, examples_at, self.max_seq_length)
            overlong = "drop"  # nothing is left to drop
        kept = handle_overlong(examples, self.max_seq_length, overlong)
        store = ExampleStore(kept.examples)
        if self.packing:
            rows = pack(store.lengths.tolist(), self.max_seq_length)
            stats = packed_stats(name, store, rows, self.max_seq_length, kept.truncated, kept.dropped)
            stats.empty = len(empty)
            return PackedDataset(store, rows), stats
        stats = padded_stats(name, store, self.micro_batch_size, PAD_TO_MULTIPLE_OF, kept.truncated, kept.dropped)
        stats.empty = len(empty)
        return PaddedDataset(store), stats

    def _collator(self) -> PackedCollator | PaddedCollator:
        """The collator for the layout in use; pads with the pad id (unk when the tokenizer has no pad)."""
        collator_cls = PackedCollator if self.packing else PaddedCollator
        return collator_cls(pad_token_id=self.pad_token_id(), pad_to_multiple_of=PAD_TO_MULTIPLE_OF)

    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its unk id (Mistral has no pad token); neither is a one-line error."""
        tokenizer = self.resolve_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an unk token to pad with: set pad_token")
        return pad_id

    def train_dataloader(self) -> DataLoader:
        """Rows shuffled per epoch with a generator seeded from ``seed`` (deterministic on resume), split
        across DDP ranks."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_sampler = SeededShuffleSampler(len(self.train_dataset), self.seed, self.micro_batch_size,
                                                   num_replicas=replicas, rank=rank)
        return ResumableDataLoader(self.train_dataset, batch_size=self.micro_batch_size, sampler=self._train_sampler,
                                   collate_fn=self._collator(), num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the loop consumed (prefetched ones are not counted until used)."""
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None and self.trainer is not None and self.trainer.training:
            sampler.consumed_batches += 1
        return batch

    def val_dataloader(self) -> DataLoader:
        """Held-out rows in a fixed order (empty when no validation data)."""
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(self.val_dataset, batch_size=self.micro_batch_size, shuffle=False,
                          collate_fn=self._collator(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict[str, Any]:
        """Enough to check on resume that the data pipeline is the same one."""
        return {"seed": self.seed, "format": self.train_format, "max_seq_length": self.max_seq_length,
                "packing": self.packing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when a checkpoint was trained with a different data layout."""
        mine = self.state_dict()
        changed = [k for k, v in state_dict.items() if k in mine and mine[k] is not None and mine[k] != v]
        if changed:
            log.warning("data settings differ from the checkpoint: %s",
                        ", ".join(f"{k} {state_dict[k]!r} -> {mine[k]!r}" for k in changed))


class PretrainDataModule(InstructionDataModule):
    """Raw-text pre-training: format forced to ``text`` (records need a ``text`` field), packed, loss on all."""

    def __init__(
        self,
        source: str | None = None,
        split: str = "train",
        val_source: str | None = None,
        val_split_fraction: float = 0.05,
        max_seq_length: int = 512,
        packing: bool = True,
        overlong: str = "truncate",
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        max_examples: int | None = None,
        subset: str | None = None,
        val_split: str | None = None,
        tokenizer: Any = None,
    ):
        """
        Args:
            source: Local file, datasets-loadable directory or hub dataset id with a ``text`` field.
            split: Split of a hub dataset or directory to train on (ignored for single files).
            val_source: Separate validation data; when None, ``val_split_fraction`` of ``source`` is held out.
            val_split_fraction: Fraction of the training records held out for validation (0 disables).
            max_seq_length: Row length in tokens; longer documents are truncated or dropped.
            packing: Pack several documents per row (the efficient default for pre-training).
            overlong: What to do with documents longer than max_seq_length: truncate or drop.
            micro_batch_size: Rows per batch on each device.
            num_workers: DataLoader worker processes (0 loads in the main process).
            seed: Seed for the validation split and the per-epoch shuffle.
            max_examples: Use only the first this many records of ``source``.
            subset: Configuration name of a hub dataset.
            val_split: Split of ``val_source`` to use (default: ``split``).
            tokenizer: Tokenizer to use; None takes the attached LightningModule's ``tokenizer``.
        """
        super().__init__(source=source, format="text", split=split, val_source=val_source,
                         val_split_fraction=val_split_fraction, max_seq_length=max_seq_length, packing=packing,
                         overlong=overlong, micro_batch_size=micro_batch_size, num_workers=num_workers,
                         seed=seed, max_examples=max_examples, chat_template=None, subset=subset,
                         val_split=val_split, tokenizer=tokenizer)


def _fail_on_overlong(examples: list[dict], locations: list[Location], max_seq_length: int) -> None:
    """Raise a DataError naming the first example longer than ``max_seq_length`` (``overlong: error``)."""
    for example, location in zip(examples, locations):
        length = len(example["input_ids"])
        if length > max_seq_length:
            prompt = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), length)
            part = f"its prompt alone is {prompt} tokens" if prompt >= max_seq_length else f"it is {length} tokens"
            raise DataError(f"longer than max_seq_length={max_seq_length}: {part} (overlong=error; truncate or "
                            "drop would keep going)", location)


def _progress(records: list[dict], locations: list[Location], name: str) -> Iterator[tuple[dict, Location]]:
    """Pair records with locations, behind a progress bar for large sets."""
    pairs = zip(records, locations)
    if len(records) < PROGRESS_BAR_MIN_RECORDS:
        return iter(pairs)
    from tqdm.auto import tqdm  # deferred: only large sets need it

    return iter(tqdm(pairs, total=len(records), desc=f"tokenizing {name}", unit="ex"))
