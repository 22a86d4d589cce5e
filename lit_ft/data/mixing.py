"""Several data sources in one training set: each source's settings, the weighted draws, and the per-source
statistics printed at setup.

``data.sources`` lists :class:`MixSource` entries (a file, directory, hub id or record source, with its own
format, split and weight). Every training example is drawn from source ``i`` with probability
``weight_i / sum(weights)``, as ``datasets.interleave_datasets(probabilities=..., seed=...)`` does; draw ``k`` is a
pure function of the seed and ``k`` (:class:`MixDraws`), so a mix is the same on every run and a streamed mix
resumes from a draw count alone (:mod:`lit_ft.data.streaming`).

The mix ends, as the datasets library's ``stopping_strategy``, when the first source runs out
(``first_exhausted``, its default: no example is seen twice in an epoch) or when every source has been seen
once (``all_exhausted``: the smaller sources are repeated, each pass in a new seeded order).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lit_ft.data.sources import DataError, looks_like_path

if TYPE_CHECKING:
    from lit_ft.data.records import RecordSource

Stopping = Literal["first_exhausted", "all_exhausted"]
DRAW_BLOCK = 4096  # draws made per generator call: cheap to regenerate on resume, fast to serve


@dataclass
class MixSource:
    """One source of a mix (an entry of ``data.sources``).

    Args:
        source: Local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory, hub dataset
            id, or a record source (in YAML ``{class_path: lit_ft.data.embedded.EmbeddedWorld}``).
        weight: Relative sampling weight; the mix normalises the weights to probabilities. 0 leaves the source out.
        format: Record format of this source ("auto": detected from its first record).
        split: Split of a hub dataset or directory (ignored for single files and record sources).
        subset: Configuration name of a hub dataset.
        streaming: Read the source lazily while training (datasets larger than memory) instead of loading and
            tokenizing it at setup. Record sources are in memory already and are never streamed.
        max_examples: Use only the first this many records of the source.
        val_records: A streamed source's first this many records are held out for validation (0: none; a stream's
            length is unknown, so no fraction of it can be held out). Map-style sources use the module's
            ``val_split_fraction`` instead.
        name: How statistics and errors name the source (default: the file name, hub id or record source class).
    """

    source: str | RecordSource
    weight: float = 1.0  # equal weights unless told: the plain concatenation's proportions are rarely meant
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    streaming: bool = False
    max_examples: int | None = None
    val_records: int = 0  # 0: a stream trains on all of itself unless asked to hold some out
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.source, str):
            return Path(self.source).name if looks_like_path(self.source) else self.source
        return type(self.source).__name__

    def describe(self) -> dict[str, Any]:
        """The entry as plain data (what a checkpoint's hyper-parameters and data state hold)."""
        from lit_ft.data.records import describe_source  # deferred: records imports Lightning

        return {"source": describe_source(self.source), "weight": self.weight, "format": self.format,
                "split": self.split, "subset": self.subset, "streaming": self.streaming,
                "max_examples": self.max_examples, "val_records": self.val_records, "name": self.name}


def check_sources(sources: list[MixSource | dict], formats: tuple[str, ...]) -> list[MixSource]:
    """Validate ``data.sources`` before any loading: each fault is one line naming the source.

    Checks the weights (finite, not negative, a positive sum), the formats against ``formats``, and that a
    local file exists. Returns the entries as :class:`MixSource` (dicts from Python callers are converted).
    """
    if not sources:
        raise DataError("data.sources is empty: list at least one source, or set data.source instead")
    checked: list[MixSource] = []
    for i, entry in enumerate(sources):
        if isinstance(entry, dict):
            try:
                entry = MixSource(**entry)
            except TypeError as e:
                raise DataError(f"data.sources[{i}]: {e}") from e
        if not isinstance(entry, MixSource):
            raise DataError(f"data.sources[{i}]: expected a mapping with source, weight, format..., "
                            f"got {type(entry).__name__}")
        where = f"data.sources[{i}] ({entry.label})"
        if isinstance(entry.weight, bool) or not isinstance(entry.weight, (int, float)) \
                or not math.isfinite(entry.weight):
            raise DataError(f"{where}: weight must be a finite number, got {entry.weight!r}")
        if entry.weight < 0:
            raise DataError(f"{where}: weight {entry.weight} is negative; weights are relative sampling rates >= 0")
        if entry.format != "auto" and entry.format not in formats:
            raise DataError(f"{where}: unknown format '{entry.format}' (expected auto, {', '.join(formats)})")
        if entry.max_examples is not None and entry.max_examples < 1:
            raise DataError(f"{where}: max_examples must be >= 1, got {entry.max_examples}")
        if entry.val_records < 0:
            raise DataError(f"{where}: val_records must be >= 0, got {entry.val_records}")
        if entry.val_records and not entry.streaming:
            raise DataError(f"{where}: val_records applies to streamed sources; a loaded source is split by "
                            "data.val_split_fraction")
        if isinstance(entry.source, str):
            path = Path(entry.source).expanduser()
            if not path.exists() and looks_like_path(entry.source):
                raise DataError(f"{where}: file not found: {entry.source}")
        checked.append(entry)
    total = sum(entry.weight for entry in checked)
    if not total > 0:
        raise DataError(f"data.sources: the weights sum to {total:g}; at least one source needs a positive weight")
    return checked


def probabilities(weights: list[float]) -> np.ndarray:
    """Weights normalised to sampling probabilities."""
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()


class MixDraws:
    """Which source draw ``k`` of a mix takes: a pure function of ``(seed, k)``.

    Draws come in blocks of :data:`DRAW_BLOCK` from ``numpy.random.default_rng([seed, block])``, so the k-th draw
    costs one block's generation at most, wherever a resume starts.
    """

    def __init__(self, weights: list[float], seed: int):
        self.p = probabilities(weights)
        self.seed = seed
        self._block = -1
        self._choices: np.ndarray | None = None

    def __getitem__(self, k: int) -> int:
        block, at = divmod(k, DRAW_BLOCK)
        if block != self._block:
            rng = np.random.default_rng([self.seed, block])
            self._choices, self._block = rng.choice(len(self.p), size=DRAW_BLOCK, p=self.p), block
        return int(self._choices[at])


def pass_order(size: int, seed: int, source: int, epoch: int) -> list[int]:
    """The seeded order in which pass ``epoch`` over a loaded source of ``size`` items visits them."""
    return np.random.default_rng([seed, source, epoch]).permutation(size).tolist()


def interleave(sizes: list[int], weights: list[float], seed: int,
               stopping: Stopping = "first_exhausted") -> list[tuple[int, int]]:
    """The mixed order of loaded sources: ``(source, item)`` pairs, each draw taking the next item of the source
    :class:`MixDraws` picks (each source visited in a seeded order, a new one per pass).

    ``first_exhausted`` stops at the first draw whose source has no item left; ``all_exhausted`` restarts a
    finished source and stops once every source with a positive weight has been seen whole. Sources of weight 0
    are never drawn.
    """
    live = [i for i, w in enumerate(weights) if w > 0]
    for i in live:
        if sizes[i] == 0:
            raise ValueError(f"source {i} has no items")
    draws = MixDraws(weights, seed)
    orders = {i: pass_order(sizes[i], seed, i, 0) for i in live}
    passes, offsets = dict.fromkeys(live, 0), dict.fromkeys(live, 0)
    unfinished = set(live)
    mixed: list[tuple[int, int]] = []
    k = 0
    while True:
        source = draws[k]
        k += 1
        if offsets[source] == sizes[source]:
            if stopping == "first_exhausted":
                return mixed
            passes[source] += 1
            orders[source], offsets[source] = pass_order(sizes[source], seed, source, passes[source]), 0
        mixed.append((source, orders[source][offsets[source]]))
        offsets[source] += 1
        if offsets[source] == sizes[source]:
            unfinished.discard(source)
            if stopping == "all_exhausted" and not unfinished:
                return mixed


# -------------------------------------------------------------------------------------------- statistics
@dataclass
class SourceStats:
    """What one source gave the mix: records read, what was dropped and why, and its share."""

    label: str
    weight: float  # the normalised probability
    streaming: bool = False
    format: str | None = None  # the record format the source is read as
    records: int = 0  # records read (for a stream: read so far)
    examples: int = 0  # records that became training examples
    tokens: int = 0  # tokens of those examples
    truncated: int = 0  # examples cut to max_seq_length (kept)
    dropped: Counter = field(default_factory=Counter)  # reason -> records dropped
    mixed_examples: int = 0  # examples of this source in the training mix
    mixed_tokens: int = 0

    def line(self, total_examples: int, total_tokens: int) -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.dropped.items()))
        share = self.mixed_examples / total_examples if total_examples else 0.0
        token_share = self.mixed_tokens / total_tokens if total_tokens else 0.0
        read = "read so far" if self.streaming else "read"
        return (f"{self.label}{' (streamed)' if self.streaming else ''}: weight {self.weight:.1%}, "
                f"{self.records:,} records {read}, {self.examples:,} examples, {self.tokens:,} tokens, "
                f"dropped {dropped:,}{f' ({reasons})' if reasons else ''}, truncated {self.truncated:,}; "
                f"in the mix {self.mixed_examples:,} examples ({share:.1%}), "
                f"{self.mixed_tokens:,} tokens ({token_share:.1%})")

    def plan(self) -> str:
        """What is known of a source of a streamed mix before training reads it."""
        how = "streamed while training" if self.streaming else "loaded, drawn from in a seeded order"
        return f"{self.label}: weight {self.weight:.1%}, {self.format} records, {how}"

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "weight": self.weight, "streaming": self.streaming, "format": self.format,
                "records": self.records,
                "examples": self.examples, "tokens": self.tokens, "truncated": self.truncated,
                "dropped": dict(self.dropped), "mixed_examples": self.mixed_examples,
                "mixed_tokens": self.mixed_tokens}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SourceStats:
        return cls(**{**state, "dropped": Counter(state.get("dropped", {}))})


def mix_report(stats: list[SourceStats], heading: str, planned: bool = False) -> list[str]:
    """The lines printed at setup (and for a stream at the end of fit): a heading and one line per source
    (``planned``: a stream's sources before training reads them)."""
    if planned:
        return [heading] + [f"  {s.plan()}" for s in stats]
    total_examples = sum(s.mixed_examples for s in stats)
    total_tokens = sum(s.mixed_tokens for s in stats)
    return [heading] + [f"  {s.line(total_examples, total_tokens)}" for s in stats]
