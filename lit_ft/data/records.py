"""The records base of every DataModule: where records come from, the validation split, the resumable seeded
order, and the tokenizer contract.

A :class:`RecordsDataModule` reads records (plain dicts) from a file or hub dataset id (:mod:`lit_ft.data.sources`)
or from a record source object such as the embedded world (:class:`lit_ft.data.embedded.EmbeddedWorld`), holds
out a validation split, and serves the training rows in a seeded order that a checkpoint resumes exactly. What
the records become is each subclass's own business, in two methods:

* :meth:`RecordsDataModule.build`: records of one split -> a dataset and its stats (``examples``, ``dropped``,
  printed once at setup);
* :meth:`RecordsDataModule.collator`: the function that turns a list of dataset items into a batch.

The tokenizer is the model's, given once with :meth:`RecordsDataModule.connect` (the ``lit-ft`` command does it
after building the model and the data module, as LitGPT's ``DataModule.connect``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_ft.data.formats import check_format_name, resolve_format
from lit_ft.data.heldout import HeldOutItem, heldout_items
from lit_ft.data.mixing import (
    MixSource,
    SourceStats,
    Stopping,
    interleave,
    mix_report,
    probabilities,
)
from lit_ft.data.sources import DataError, Location, SourceSplits, load_records_with_locations, read_splits
from lit_ft.data.streaming import (
    POSITION_KEY,
    LoadedReader,
    StreamedMix,
    StreamedReader,
    StreamingDataLoader,
    stream_records,
)

log = logging.getLogger("lit_ft")

PROGRESS_BAR_MIN_RECORDS = 10_000  # below this, tokenizing takes a second or two: no bar needed
PAD_TO_MULTIPLE_OF = 8  # tensor-core friendly batch widths
MIN_SEQ_LENGTH = 2  # the shortest sequence with something to predict: one token of context, one to learn
EMBEDDED_LABEL = "<embedded data>"  # where errors about records from a record source say they are

RecordShape = Literal["text", "instruction", "preference", "prompt"]


# ------------------------------------------------------------------------------------------ record sources
@dataclass(frozen=True)
class RecordSplits:
    """What a record source gives a DataModule: training and validation records, and what evaluation asks."""

    train: list[dict]
    val: list[dict]
    heldout: list[dict] | None = None  # records the held-out evaluation renders as prompts; None: ``val``
    checkable: bool = False  # every held-out record carries one exactly checkable reference answer


@runtime_checkable
class RecordSource(Protocol):
    """Records generated rather than read: ``splits(shape)`` gives the records of one data shape.

    ``shape`` is what the asking DataModule reads: ``text`` (pre-training documents), ``instruction`` (SFT
    records), ``preference`` (chosen/rejected pairs) or ``prompt`` (records PPO takes prompts from).
    """

    def splits(self, shape: RecordShape) -> RecordSplits: ...


def describe_source(source: str | RecordSource | None) -> str | dict | None:
    """A source as plain data, as YAML gives it (``{class_path, init_args}`` for a record source dataclass)."""
    if source is None or isinstance(source, str):
        return source
    described: dict[str, Any] = {"class_path": f"{type(source).__module__}.{type(source).__qualname__}"}
    if dataclasses.is_dataclass(source):
        described["init_args"] = dataclasses.asdict(source)
    return described


# ------------------------------------------------------------------------------------ the resumable order
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


def at_least(name: str, value: int, minimum: int) -> int:
    """``value``, or a DataError naming the setting when it is below ``minimum`` (the data modules' bounds)."""
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return value


def progress(records: list[dict], locations: list[Location], name: str) -> Iterator[tuple[dict, Location]]:
    """Pair records with locations, behind a progress bar for large sets (tokenizing 50k records takes a while)."""
    pairs = zip(records, locations)
    if len(records) < PROGRESS_BAR_MIN_RECORDS:
        return iter(pairs)
    from tqdm.auto import tqdm  # deferred: only large sets need it

    return iter(tqdm(pairs, total=len(records), desc=f"tokenizing {name}", unit="ex"))


# ------------------------------------------------------------------------------------------ the base module
@dataclass(frozen=True)
class Lengths:
    """The mean and the longest of some token lengths, as a split's stats print them (0.0 and 0 for none)."""

    mean: float = 0.0
    max: int = 0

    @classmethod
    def of(cls, lengths: Sequence[int]) -> Lengths:
        return cls(sum(lengths) / len(lengths), max(lengths)) if lengths else cls()

    def __str__(self) -> str:
        return f"mean {self.mean:.1f}, max {self.max:,}"


@dataclass
class BuiltSplit:
    """What :meth:`RecordsDataModule.build` makes of one split's records."""

    dataset: Dataset
    stats: Any  # has ``examples`` and ``dropped``; printed once at setup
    format: str | None = None  # the record format the split was read as (None: nothing was read)


class RecordsDataModule(L.LightningDataModule):
    """Records from a file, hub dataset or record source; a validation split; a resumable seeded order.

    Subclasses set ``shape`` (what they ask a record source for) and ``formats`` (the record formats they read),
    and implement :meth:`build` and :meth:`collator`. The tokenizer comes from :meth:`connect`; without it (a
    plain ``trainer.fit(module, datamodule=dm)``), :meth:`setup` connects to the attached LightningModule's
    ``tokenizer`` itself.

    The settings below are the ones every data shape shares. A subclass spells out ``source`` and ``format``
    (what they mean depends on its shape), its own settings, and the shared ones whose default differs for its
    shape (``micro_batch_size``), keyword-only, and passes the rest on as ``**kwargs``: jsonargparse follows
    ``super().__init__(**kwargs)``, so ``lit-ft fit --data.help CLASS`` and ``--print_config`` list every
    setting with its type and default as if the subclass had spelled them all out. A mix of several sources
    (``sources``, ``mix_stopping``) belongs to the subclass that tokenizes per source
    (:class:`lit_ft.data.instruction.InstructionDataModule`).

    Args:
        source: Local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory, hub
            dataset id such as ``tatsu-lab/alpaca``, or a record source object (in YAML
            ``{class_path: lit_ft.data.embedded.EmbeddedWorld}``, the embedded world). Required: None fails at
            setup, naming the choices.
        format: Record format of ``source``: "auto" detects it from the first record, or one of ``formats``.
        split: Split of a hub dataset or directory to train on (ignored for single files).
        val_source: Separate validation data; when None, ``val_split_fraction`` of ``source`` is held out.
        val_split: Split of ``val_source`` to use (default: ``split``).
        val_split_fraction: Fraction of the training records held out for validation (0 disables).
        subset: Configuration name of a hub dataset.
        max_examples: Use only the first this many training records (before the validation split).
        chat_template: Jinja chat template overriding the tokenizer's; "builtin" forces the built-in
            Mistral-instruct template.
        micro_batch_size: Rows (or pairs, or prompts) per batch on each device.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: Seed of the validation split and the per-epoch shuffle.
    """

    shape: ClassVar[RecordShape]  # what a record source is asked for; each subclass names its own
    formats: ClassVar[tuple[str, ...]]  # the record formats ``format`` may name besides "auto"
    format_noun: ClassVar[str] = "format"  # how an unknown-format error names the setting

    def __init__(
        self,
        source: str | RecordSource | None = None,
        format: str = "auto",
        split: str = "train",
        val_source: str | None = None,
        val_split: str | None = None,
        val_split_fraction: float = 0.05,
        subset: str | None = None,
        max_examples: int | None = None,
        chat_template: str | None = None,
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        # Collects the subclass's own arguments too (Lightning reads every __init__ frame); ``sources`` is
        # described by the subclass that mixes.
        self.save_hyperparameters(ignore=["source", "sources"])
        self.hparams["source"] = describe_source(source)  # plain data: checkpoints load with weights_only=True
        if source is not None and not isinstance(source, (str, RecordSource)):
            raise DataError(f"source must be a file, a hub dataset id or a record source, got {type(source).__name__}")
        self.sources: list[MixSource] | None = None  # a mix instead of ``source``: set by a subclass that mixes
        self.mix_stopping: Stopping = "first_exhausted"
        self.mix_stats: list[SourceStats] = []  # per source, set at setup (a stream's grow as training reads it)
        if not 0.0 <= val_split_fraction < 1.0:
            raise DataError(f"val_split_fraction must be in [0, 1), got {val_split_fraction}")
        at_least("micro_batch_size", micro_batch_size, 1)
        check_format_name(format, self.formats, self.format_noun)
        self.source = source
        self.format = format
        self.split = split
        self.val_source = val_source
        self.val_split = val_split
        self.val_split_fraction = val_split_fraction
        self.subset = subset
        self.max_examples = max_examples
        self.chat_template = chat_template
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: Any = None
        self.max_seq_length: int | None = None  # subclasses that cut sequences set it; connect may override
        self.max_prompt_length: int | None = None  # held-out prompts are cut to it from the left (PPO prompts)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.stats_train: Any = None
        self.stats_val: Any = None
        self.train_format: str | None = None
        self.val_format: str | None = None
        self._heldout_records: list[dict] = []
        self._heldout_locations: list[Location] = []
        self._heldout: list[HeldOutItem] | None = None
        self._checkable = False

    # ------------------------------------------------------------------------------------- what subclasses do
    def build(self, name: str, records: list[dict], locations: list[Location]) -> BuiltSplit:
        """Tokenize one split (``name`` is "train" or "val") into a dataset and its stats.

        Raise a :class:`DataError` naming the reason when ``name`` is "train" and nothing is usable.
        """
        raise NotImplementedError

    def collator(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        """The batch builder of this module's dataset items (a small picklable object, for DataLoader workers)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- the contract
    def connect(self, tokenizer: Any, batch_size: int | None = None, max_seq_length: int | None = None) -> None:
        """Give the module what it cannot know from its own settings: the model's tokenizer, and optionally a
        micro-batch size and a longest sequence that replace the configured ones (prompts are cut to it too).

        ``lit-ft`` calls it once, after instantiating the model and the data module; Python users may call it
        before ``trainer.fit`` (or let :meth:`setup` connect to the LightningModule's ``tokenizer``). A connect
        that changes anything after setup makes the next setup rebuild the splits.
        """
        if batch_size is not None:
            at_least("batch_size", batch_size, 1)
        if max_seq_length is not None:
            at_least("max_seq_length", max_seq_length, MIN_SEQ_LENGTH)
        changed = tokenizer is not self.tokenizer
        self.tokenizer = tokenizer
        if batch_size is not None:
            changed |= batch_size != self.micro_batch_size
            self.micro_batch_size = batch_size
        if max_seq_length is not None:
            changed |= max_seq_length != self.max_seq_length
            self.max_seq_length = max_seq_length
            if self.max_prompt_length is not None and self.max_prompt_length > max_seq_length:
                self.max_prompt_length, changed = max_seq_length, True  # a prompt never exceeds a sequence
        if changed:
            self.train_dataset = self.val_dataset = self._heldout = None

    @property
    def source_label(self) -> str:
        """How errors name the training records: the file or hub id, the embedded placeholder, or the mix."""
        if self.sources:
            return "data.sources (" + ", ".join(entry.label for entry in self.sources) + ")"
        return self.source if isinstance(self.source, str) else EMBEDDED_LABEL

    @property
    def streaming(self) -> bool:
        """True when a source of the mix is read while training (then the whole mix is a stream)."""
        return any(entry.streaming and isinstance(entry.source, str) for entry in self.sources or [])

    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its unk id (Mistral has no pad token); neither is a one-line error."""
        tokenizer = self._connected_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an unk token to pad with: set pad_token")
        return pad_id

    def _connected_tokenizer(self) -> Any:
        """The connected tokenizer; unconnected, the attached LightningModule's (connected here)."""
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is None:
                raise RuntimeError("no tokenizer: call connect(tokenizer) or attach a LightningModule with a "
                                   ".tokenizer")
            self.connect(tokenizer)
        return self.tokenizer

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize and build both splits once; later calls (validate after fit) are no-ops.

        Without a :meth:`connect` first, the tokenizer is the attached LightningModule's ``tokenizer`` (so a plain
        ``trainer.fit(module, datamodule=dm)`` works).
        """
        if self.train_dataset is not None:
            return
        self._connected_tokenizer()
        if self.sources:
            self._setup_mix()
            return
        train, train_loc, val, val_loc = self.load_splits()
        built = self.build("train", train, train_loc)
        self.train_dataset, self.stats_train, self.train_format = built.dataset, built.stats, built.format
        built = self.build("val", val, val_loc)
        self.val_dataset, self.stats_val, self.val_format = built.dataset, built.stats, built.format
        for stats in (self.stats_train, self.stats_val):
            log.info("data %s", stats)
            if rank_zero_only.rank == 0:
                print(f"[data] {stats}")

    def load_splits(self) -> tuple[list[dict], list[Location], list[dict], list[Location]]:
        """Train and validation records with their locations: a record source's, a separate validation source,
        or a seeded random split of ``source``. Also sets what :meth:`heldout` renders."""
        if self.source is None:
            raise DataError("no data source given: set data.source to a file or hub dataset id, or to "
                            "{class_path: lit_ft.data.embedded.EmbeddedWorld} for the embedded world")
        if self.val_source is not None and not isinstance(self.source, RecordSource):
            records, locations = load_records_with_locations(self.source, self.split, self.subset)
            if self.max_examples is not None:
                records, locations = records[: self.max_examples], locations[: self.max_examples]
            if not records:
                raise DataError("no records", self.source)
            val, val_loc = load_records_with_locations(self.val_source, self.val_split or self.split, self.subset)
            self._set_heldout(val, val_loc, checkable=False)
            return records, locations, val, val_loc
        splits = read_splits(self.source, self.shape, self.split, self.subset, self.max_examples,
                             self.val_split_fraction, self.seed)
        self._set_heldout(splits.heldout, splits.heldout_at, splits.checkable)
        return splits.train, splits.train_at, splits.val, splits.val_at

    # ---------------------------------------------------------------------------------------------- the mix
    def _setup_mix(self) -> None:
        """Read every source of ``data.sources``, tokenize each in its own format, count what each gives, and mix
        the training examples by weight (:func:`lit_ft.data.mixing.interleave`); or, when a source streams, set up
        the stream (:class:`lit_ft.data.streaming.StreamedMix`). Validation examples of all sources are kept
        together, unweighted."""
        from lit_ft.data.instruction import Tokenized  # deferred: instruction imports this module

        weights = probabilities([entry.weight for entry in self.sources])
        streaming = self.streaming
        stats, examples, formats, readers = [], [], [], []
        val = Tokenized([])
        heldout: list[tuple[list[dict], list[Location], bool]] = []
        for i, entry in enumerate(self.sources):
            where = f"data.sources[{i}] ({entry.label})"
            stat = SourceStats(entry.label, float(weights[i]), streaming=entry.streaming and streaming)
            stats.append(stat)
            try:
                if entry.streaming and isinstance(entry.source, str):
                    want = entry.val_records + 1  # the held-out head and the first training record
                    if entry.max_examples is not None:
                        want = min(want, entry.max_examples)
                    head = list(itertools.islice(stream_records(entry.source, entry.split, entry.subset), want))
                    if len(head) <= entry.val_records:
                        raise DataError(f"no training records after the {entry.val_records} held out for validation")
                    fmt = self._source_format(entry, *head[-1])
                    readers.append(StreamedReader(entry.source, entry.split, entry.subset, entry.val_records,
                                                  entry.max_examples))
                    val_records, val_at = [r for r, _ in head[:-1]], [loc for _, loc in head[:-1]]
                    splits = SourceSplits([], [], val_records, val_at, val_records, val_at)
                else:
                    splits = read_splits(entry.source, self.shape, entry.split, entry.subset, entry.max_examples,
                                         self.val_split_fraction, self.seed)
                    if not splits.train:
                        raise DataError("no training records")
                    fmt = self._source_format(entry, splits.train[0], splits.train_at[0])
                    if streaming:
                        readers.append(LoadedReader(splits.train, splits.train_at, self.seed, i))
                formats.append(fmt)
                stat.format = fmt
                if not streaming:
                    part = self.tokenize(f"train {entry.label}", splits.train, splits.train_at, fmt)
                    stat.records, stat.examples, stat.truncated = len(splits.train), len(part.examples), part.truncated
                    stat.tokens = sum(len(e["input_ids"]) for e in part.examples)
                    stat.dropped.update({"empty response": part.empty, "overlong": part.dropped})
                    stat.dropped = +stat.dropped  # keep the reasons that happened
                    if entry.weight > 0 and not part.examples:
                        raise DataError(f"no usable training examples ({stat.line(0, 0)})")
                    examples.append(part.examples)
                part = self.tokenize(f"val {entry.label}", splits.val, splits.val_at, fmt)
            except DataError as err:
                if err.location is not None:  # a record's own location says which source it is
                    raise
                raise DataError(f"{where}: {err.problem}") from err
            val.examples += part.examples
            val.truncated, val.dropped, val.empty = (val.truncated + part.truncated, val.dropped + part.dropped,
                                                     val.empty + part.empty)
            if entry.weight > 0:
                heldout.append((splits.heldout, splits.heldout_at, splits.checkable))
        # Exact match means something only on checkable references: when some sources have them, the held-out
        # evaluation asks those sources alone; otherwise every source's held-out records.
        if any(checkable for *_, checkable in heldout):
            heldout = [part for part in heldout if part[2]]
        self._set_heldout([r for part in heldout for r in part[0]], [loc for part in heldout for loc in part[1]],
                          bool(heldout) and all(part[2] for part in heldout))
        main = max(range(len(formats)), key=lambda i: weights[i])
        self.train_format = self.val_format = formats[main]  # what the adapter is recorded as trained on
        if len(set(formats)) > 1:
            log.warning("data.sources mix formats %s; the run records %s (its heaviest source's)",
                        sorted(set(formats)), formats[main])
        if streaming:
            self.train_dataset = StreamedMix(readers, formats, stats, self.seed, self._tokenize_one, self.collator(),
                                             self.max_seq_length, getattr(self, "packing", True),
                                             self.micro_batch_size, self.mix_stopping)
            self.stats_train = None
            heading = (f"[data] streamed mix of {len(stats)} sources (seed {self.seed}, {self.mix_stopping}); "
                       "counts grow as training reads, and are printed at the end of fit")
        else:
            order = interleave([len(e) for e in examples], list(weights), self.seed, self.mix_stopping)
            mixed = Tokenized([examples[source][item] for source, item in order])
            for source, item in order:
                stats[source].mixed_examples += 1
                stats[source].mixed_tokens += len(examples[source][item]["input_ids"])
            mixed.truncated = sum(s.truncated for s in stats)
            mixed.dropped = sum(s.dropped["overlong"] for s in stats)
            mixed.empty = sum(s.dropped["empty response"] for s in stats)
            built = self.layout("train", mixed, self.train_format)
            self.train_dataset, self.stats_train = built.dataset, built.stats
            heading = f"[data] mix of {len(stats)} sources (seed {self.seed}, {self.mix_stopping})"
        self.mix_stats = stats
        built = self.layout("val", val, self.val_format)
        self.val_dataset, self.stats_val = built.dataset, built.stats
        split_lines = [f"[data] {s}" for s in (self.stats_train, self.stats_val) if s is not None]
        self._print(mix_report(stats, heading, planned=streaming) + split_lines)

    def _source_format(self, entry: MixSource, record: dict, location: Location) -> str:
        """A source's format: its own, else the module's when fixed (pre-training's text), else detected."""
        fmt = entry.format if entry.format != "auto" else self.format
        return resolve_format("auto", record, location) if fmt == "auto" else fmt

    def _tokenize_one(self, record: dict, location: Location, fmt: str) -> tuple[dict | None, str | None, bool]:
        """One streamed record -> its example, or None and why it was dropped; and whether it was truncated."""
        part = self.tokenize("stream", [record], [location], fmt)
        if part.examples:
            return part.examples[0], None, bool(part.truncated)
        return None, "empty response" if part.empty else "overlong", False

    @staticmethod
    def _print(lines: list[str]) -> None:
        for line in lines:
            log.info("%s", line)
            if rank_zero_only.rank == 0:
                print(line)

    def teardown(self, stage: str) -> None:
        """After fitting a stream, print what each source gave the training it consumed."""
        if stage == "fit" and isinstance(self.train_dataset, StreamedMix):
            stats = self.train_dataset.source_stats()
            self.mix_stats = stats
            self._print(mix_report(stats, f"[data] streamed mix, as consumed by training "
                                          f"({self.train_dataset.consumed['draws']:,} draws)"))

    def _set_heldout(self, records: list[dict], locations: list[Location], checkable: bool) -> None:
        self._heldout_records, self._heldout_locations, self._checkable = list(records), list(locations), checkable
        self._heldout = None

    # --------------------------------------------------------------------------------------------- held out
    @property
    def checkable(self) -> bool:
        """True when every held-out item's reference is the one exactly right answer (the embedded world)."""
        return self._checkable

    def heldout(self) -> list[HeldOutItem]:
        """The held-out records as prompts, rendered as in training (:mod:`lit_ft.data.heldout`); raw-text records
        have no prompt and give no item. Sets the module up first when needed."""
        if self.train_dataset is None:
            self.setup()
        if self._heldout is None:
            self._heldout = heldout_items(self._heldout_records, self._heldout_locations, self.tokenizer,
                                          self.format, self.chat_template, self.max_prompt_length)
        return self._heldout

    # ------------------------------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        """Rows shuffled per epoch with a generator seeded from ``seed`` (deterministic on resume), split
        across DDP ranks."""
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if isinstance(self.train_dataset, StreamedMix):  # whole batches, made in this process (its position)
            self.train_dataset.replicas, self.train_dataset.rank = replicas, rank
            self.train_dataset.micro_batch_size = self.micro_batch_size
            self._train_sampler = None
            return StreamingDataLoader(self.train_dataset, batch_size=None, num_workers=0)
        self._train_sampler = SeededShuffleSampler(len(self.train_dataset), self.seed, self.micro_batch_size,
                                                   num_replicas=replicas, rank=rank)
        return ResumableDataLoader(self.train_dataset, batch_size=self.micro_batch_size, sampler=self._train_sampler,
                                   collate_fn=self.collator(), num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the loop consumed (prefetched ones are not counted until used); a streamed
        batch's position is taken out of it and becomes the stream's consumed position."""
        position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        if position is not None and self.trainer is not None and self.trainer.training:
            self.train_dataset.consumed = position
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None and self.trainer is not None and self.trainer.training:
            sampler.consumed_batches += 1
        return batch

    def val_dataloader(self) -> DataLoader:
        """Held-out rows in a fixed order (empty when no validation data)."""
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(self.val_dataset, batch_size=self.micro_batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    # ---------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Enough to check on resume that the data pipeline is the same one: the seed, the format, the lengths
        and the layout of the rows."""
        state = {"seed": self.seed, "format": self.train_format}
        if self.sources:
            state["sources"] = [entry.describe() for entry in self.sources]
            state["mix_stopping"] = self.mix_stopping
        for name in ("max_seq_length", "max_prompt_length", "packing"):
            value = getattr(self, name, None)
            if value is not None:
                state[name] = value
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when a checkpoint was trained with a different data layout."""
        mine = self.state_dict()
        changed = [k for k, v in state_dict.items() if k in mine and mine[k] is not None and mine[k] != v]
        if changed:
            log.warning("data settings differ from the checkpoint: %s",
                        ", ".join(f"{k} {state_dict[k]!r} -> {mine[k]!r}" for k in changed))
