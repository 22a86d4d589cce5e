"""Data modules for the embedded default: the generated world of :mod:`lit_ft.data.synthetic`.

``EmbeddedCorpus`` pre-trains the tiny base on prose; ``EmbeddedTasks`` instruction-tunes it. Both share the
same world (``world_seed``, ``num_train``, ``num_heldout``), so the base knows the facts that SFT then asks for.
Either accepts ``source`` to train on a real file instead, exactly like their parent classes.
"""

from __future__ import annotations

from typing import Any

from lit_ft.data.datamodule import InstructionDataModule, PretrainDataModule
from lit_ft.data.gold import check_style_weights, styled_instruction_records
from lit_ft.data.sources import DataError
from lit_ft.data.synthetic import corpus_records, generate_facts, instruction_records, split_facts


class EmbeddedTasks(InstructionDataModule):
    """Instruction tasks with exactly checkable answers (add, successor, reverse, sort, max, count).

    The held-out split is both the validation set and the exact-match set of the generation callback. Answers
    come in the styles of :mod:`lit_ft.data.gold`, drawn per fact with ``answer_styles``; exact match reads the
    answer from any style.

    Args:
        num_train: SFT training examples (2000: enough for every task family to be seen ~300 times).
        num_heldout: held-out examples scored by exact match (200: +-3.5 points of sampling error at 50%).
        world_seed: seed of the generated world; must match the pre-training corpus the base learned.
        answer_styles: weight of each answer style (``sentence``, ``bare``, ``label``) in the demonstrations, None
            for :data:`lit_ft.data.gold.DEFAULT_STYLE_WEIGHTS` (the preferred ``sentence`` a 25% minority, so
            that RLHF has a preference to teach); ``{bare: 1.0}`` gives the plain answers of the original world.
        source: a real data file or hub id instead of the embedded tasks (then nothing is exactly checkable).
        format: record format of ``source`` (auto-detected by default).
        max_seq_length: packed row length (512: the reference recipe's; embedded examples are ~45 tokens).
        packing: pack examples into rows (attention never crosses examples).
        micro_batch_size: rows per batch.
        seed: shuffling seed.
        max_examples: cap on training records.
        val_split_fraction: validation fraction when ``source`` is a file.
        tokenizer: None takes the LightningModule's.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_heldout: int = 200,
        world_seed: int = 1234,
        answer_styles: dict[str, float] | None = None,
        source: str | None = None,
        format: str = "auto",
        max_seq_length: int = 512,
        packing: bool = True,
        micro_batch_size: int = 4,
        seed: int = 42,
        max_examples: int | None = None,
        val_split_fraction: float = 0.05,
        tokenizer: Any = None,
    ):
        super().__init__(
            source=source, format=format, max_seq_length=max_seq_length, packing=packing,
            micro_batch_size=micro_batch_size, seed=seed, max_examples=max_examples,
            val_split_fraction=val_split_fraction, tokenizer=tokenizer,
        )
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.world_seed = world_seed
        try:
            self.answer_styles = None if answer_styles is None else check_style_weights(answer_styles)
        except ValueError as err:
            raise DataError(f"data.answer_styles: {err}") from None

    @property
    def checkable_answers(self) -> bool:
        return self.source is None

    def embedded_records(self) -> tuple[list[dict], list[dict]]:
        """Styled demonstrations of the SFT facts; the held-out facts styled with the same mix (validation loss)."""
        train, heldout = split_facts(self.world_seed, self.num_train, self.num_heldout)
        return (styled_instruction_records(train, self.world_seed + 5, self.answer_styles),
                styled_instruction_records(heldout, self.world_seed + 6, self.answer_styles))


class EmbeddedCorpus(PretrainDataModule):
    """Prose pre-training corpus stating every fact of the embedded world in several phrasings.

    Validation text is generated from fresh facts. The generation callback is given the held-out *instruction*
    prompts, to show that a pre-trained base rambles instead of answering (exact match ~0).

    Args:
        num_train: SFT-train facts of the world (must match ``EmbeddedTasks``).
        num_heldout: held-out facts of the world (must match ``EmbeddedTasks``).
        world_seed: seed of the generated world (must match ``EmbeddedTasks``).
        extra_facts: additional random facts, so skills (reverse, sort, count) generalise beyond the world.
        sentences_per_doc: statements per document (6: documents of ~80 tokens).
        source: a real text file or hub id instead of the corpus.
        max_seq_length: packed row length (256: short rows, attention cost stays small on CPU).
        micro_batch_size: rows per batch.
        seed: shuffling seed.
        tokenizer: None takes the LightningModule's.
    """

    eval_format = "alpaca"

    def __init__(
        self,
        num_train: int = 2000,
        num_heldout: int = 200,
        world_seed: int = 1234,
        extra_facts: int = 2000,
        sentences_per_doc: int = 6,
        source: str | None = None,
        max_seq_length: int = 256,
        micro_batch_size: int = 8,
        seed: int = 42,
        tokenizer: Any = None,
    ):
        super().__init__(
            source=source, max_seq_length=max_seq_length, micro_batch_size=micro_batch_size, seed=seed,
            tokenizer=tokenizer,
        )
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.world_seed = world_seed
        self.extra_facts = extra_facts
        self.sentences_per_doc = sentences_per_doc

    @property
    def checkable_answers(self) -> bool:
        return self.source is None

    def embedded_records(self) -> tuple[list[dict], list[dict]]:
        train, heldout = split_facts(self.world_seed, self.num_train, self.num_heldout)
        docs = corpus_records(train + heldout, self.world_seed, self.extra_facts, self.sentences_per_doc)
        val_facts = generate_facts(200, self.world_seed + 99)
        val = [{"text": " ".join(s for f in val_facts[i : i + 2] for s in f.statements)} for i in range(0, 200, 2)]
        return docs, val

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.source is None:
            _, heldout = split_facts(self.world_seed, self.num_train, self.num_heldout)
            self.eval_records = instruction_records(heldout)
