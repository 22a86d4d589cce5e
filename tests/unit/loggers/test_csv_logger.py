"""Local metrics: ``<save_dir>/metrics.csv`` written at every log call, a fresh file for a fresh run, the same file
continued from the checkpoint's step for a resumed one, and the run directory rule."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks.checkpointing import ModelCheckpoint
from lit_ft.callbacks.report import RunReport
from lit_ft.data.instruction import InstructionDataModule
from lit_ft.loggers.csv_logger import CSVLogger
from lit_ft.loggers.run_dir import evaluation_record, run_dir, write_json
from lit_ft.stages.causal_lm import CausalLM
from tests.tiny_models import StopAt
from tests.tiny_runs import LORA, save_tiny_base, write_alpaca


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_land_in_save_dir_and_are_written_at_every_log_call(tmp_path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path / "runs" / "sft"))
    logger.log_metrics({"train/loss": 2.0}, step=0)
    path = tmp_path / "runs" / "sft" / "metrics.csv"
    assert Path(logger.log_dir) == path.parent and path.is_file()  # no name/version_N folders, no buffering
    logger.log_metrics({"train/loss": 1.5, "val/loss": 1.7}, step=1)  # a new column rewrites the header
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in _rows(path)] == [("0", "2.0", ""),
                                                                                  ("1", "1.5", "1.7")]


def test_a_fresh_run_starts_a_new_file_and_a_resumed_one_continues_from_its_step(tmp_path) -> None:
    first = CSVLogger(save_dir=str(tmp_path))
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    path = tmp_path / "metrics.csv"

    resumed = CSVLogger(save_dir=str(tmp_path))  # resumed from a checkpoint at step 4: the killed run logged 4, 5
    resumed.resume_at(4)
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2", "3"]
    resumed.log_metrics({"train/loss": 6.5}, step=4)
    resumed.log_metrics({"train/loss": 5.5, "val/loss": 6.0}, step=5)  # a new column keeps the earlier rows
    rows = _rows(path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "10.0"), ("1", "9.0"), ("2", "8.0"), ("3", "7.0"),
                                                            ("4", "6.5"), ("5", "5.5")]
    assert rows[-1]["val/loss"] == "6.0" and rows[0]["val/loss"] == ""

    fresh = CSVLogger(save_dir=str(tmp_path))  # not resumed: the old rows go at its first write, not before
    assert len(_rows(path)) == 6
    fresh.log_metrics({"train/loss": 3.0}, step=0)
    assert [(r["step"], r["train/loss"]) for r in _rows(path)] == [("0", "3.0")]
    assert list(tmp_path.glob("version_*")) == []


def test_run_dir_is_the_csv_loggers_folder_else_the_first_loggers_save_dir(tmp_path) -> None:
    class Trainer:
        is_global_zero = True

        def __init__(self, loggers):
            self.loggers = loggers

    class Other:
        save_dir = str(tmp_path / "wandb_dir")

    ours, lightnings = CSVLogger(save_dir=str(tmp_path / "a")), LightningCSVLogger(str(tmp_path / "b"), name="x")
    assert run_dir(Trainer([Other(), ours])) == tmp_path / "a"
    assert run_dir(Trainer([lightnings])) == Path(lightnings.log_dir)  # Lightning's: where its metrics.csv goes
    assert run_dir(Trainer([Other()])) == tmp_path / "wandb_dir"
    assert run_dir(Trainer([])) is None and write_json(Trainer([]), "cost.json", {"a": 1}) is None
    path = write_json(Trainer([ours]), "cost.json", {"a": 1})
    assert path == tmp_path / "a" / "cost.json" and path.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'


def test_evaluation_record_aligns_rows_across_before_and_after() -> None:
    class Prompt:
        def __init__(self, text, reference):
            self.text, self.reference = text, reference

    prompts = [Prompt("What is 3 + 4?", "7"), Prompt("Say hi.", None)]
    results = {"before": {"rows": [(prompts[0], "9"), (prompts[1], "yo")], "exact_match": 0.0, "scored": 2,
                          "per_task": {"add": 0.0}},
               "after": {"rows": [(prompts[0], "7"), (prompts[1], "hi")], "exact_match": 0.5, "scored": 2,
                         "per_task": {"add": 1.0}}}
    record = evaluation_record(results)
    assert record["tags"] == ["before", "after"]
    assert record["rows"] == [{"prompt": "What is 3 + 4?", "reference": "7", "before": "9", "after": "7"},
                              {"prompt": "Say hi.", "reference": "", "before": "yo", "after": "hi"}]
    assert record["scores"]["after"] == {"exact_match": 0.5, "scored": 2, "per_task": {"add": 1.0}}
    assert evaluation_record({"before": {"rows": [(prompts[1], "x")]}})["scores"] == {}  # free text: no scores


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("csv_base") / "tiny", tokenizer)


def _fit(run: Path, base: str, tokenizer, data: Path, stop_at: int | None, ckpt_path: str | None) -> L.Trainer:
    L.seed_everything(0)
    module = CausalLM(backbone=Backbone(pretrained=base, compute_dtype="float32",
                                        lora=LoraSettings(**LORA, adapter_name="sft")))
    dm = InstructionDataModule(source=str(data), val_split_fraction=0.0, max_seq_length=128, micro_batch_size=2)
    callbacks = [ModelCheckpoint(dirpath=str(run / "checkpoints"), save_last=True, every_n_train_steps=2,
                                 save_top_k=0), RunReport()]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = L.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=1, logger=CSVLogger(save_dir=str(run)),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_a_fit_interrupted_and_resumed_keeps_one_row_per_step_in_one_file(tmp_path, base, tokenizer) -> None:
    """Lightning's CSVLogger would start version_1 (or delete the file); here the resumed fit continues
    runs/<stage>/metrics.csv from the checkpoint's step, and the report is written at each end."""
    data = write_alpaca(tmp_path / "data.jsonl", 40)
    run = tmp_path / "runs" / "sft"
    _fit(run, base, tokenizer, data, stop_at=5, ckpt_path=None)  # stops after step 5; last.ckpt is at step 4
    assert sorted({int(r["step"]) for r in _rows(run / "metrics.csv") if r["train/loss"]}) == [0, 1, 2, 3, 4]
    _fit(run, base, tokenizer, data, stop_at=None, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    steps = [int(r["step"]) for r in _rows(run / "metrics.csv") if r["train/loss"]]
    assert steps == list(range(8)), steps  # 0-3 from the first fit, 4-7 from the resumed one, no step twice
    assert (run / "report.html").is_file() and not list(run.glob("version_*"))
